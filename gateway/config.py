"""Gateway settings: command-line flags with ``MMSERVE_GATEWAY_*`` env defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from mmserve_core.runtime.tls import ClientTLS, ServerTLS, add_server_tls_args, server_tls_from


@dataclass(frozen=True)
class GatewayConfig:
    checkpoint: str  # only tokenizer + chat template + config.json are read
    encoder: str = "127.0.0.1:50051"
    decoder: str = "127.0.0.1:50052"
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str | None = None
    rpc_timeout_s: float = 600.0  # unary calls and a whole Encode
    stream_idle_timeout_s: float = 60.0  # a Generate that sends nothing this long between messages
    first_token_timeout_s: float = 600.0  # a Generate's first message (queueing + prefill)
    accept_timeout_s: float = 10.0  # a decoder must accept a Generate's setup within this (else: another)
    reasoning: str = "separate"  # Gemma 4 thought channel: "separate" (reasoning_content) or "drop"
    api_key: str | None = None
    max_body_bytes: int = 64 << 20
    max_media_items: int = 16
    max_audio_seconds: float = 600.0
    url_fetch: bool = False
    url_allowlist: tuple[str, ...] = ()
    url_max_bytes: int = 20 << 20
    url_timeout_s: float = 10.0
    url_fetch_allow_private: bool = False
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = 50050
    tls: ServerTLS = field(default_factory=ServerTLS)  # HTTP and the chat gRPC API
    upstream_tls: ClientTLS = field(default_factory=ClientTLS)  # to encoders and decoders
    drain_grace_s: float = 30.0
    decoder_affinity: str = "conversation"  # or "none": the least busy decoder, whatever the conversation
    model_aliases: tuple[str, ...] = ()  # names besides model_id that requests may use
    # /v1/audio/transcriptions: the instruction sent with the clip ({language} when one is given)
    transcription_instruction: str = "Transcribe the following speech segment into text."
    transcription_instruction_language: str = "Transcribe the following speech segment in {language} into " \
                                              "{language} text."
    responses_store_bytes: int = 64 << 20  # /v1/responses kept for previous_response_id (LRU by bytes)
    chat_store_bytes: int = 64 << 20  # chat completions created with store: true (LRU by bytes)


def _env(name: str, default):
    return os.environ.get(f"MMSERVE_GATEWAY_{name}", default)


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    p = argparse.ArgumentParser(prog="mmserve-gateway", description="mmserve OpenAI-compatible gateway")
    _serving_args(p)
    _limit_args(p)
    _upstream_args(p)
    return _config(p.parse_args(argv))


def _serving_args(p: argparse.ArgumentParser) -> None:
    """What is served, where, and how requests are answered."""
    p.add_argument("--checkpoint", default=_env("CHECKPOINT", None), required=_env("CHECKPOINT", None) is None,
                   help="checkpoint directory (tokenizer and chat template are read from it)")
    p.add_argument("--encoder", default=_env("ENCODER", "127.0.0.1:50051"),
                   help="encoder host:port, or several comma-separated (least busy, failover); a DNS name with "
                        "several addresses is that many replicas")
    p.add_argument("--decoder", default=_env("DECODER", "127.0.0.1:50052"),
                   help="decoder host:port, or several comma-separated (least busy within conversation affinity, "
                        "failover, full ones retried elsewhere); a DNS name with several addresses is that many "
                        "replicas")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 8000)), help="0 = pick a free port")
    p.add_argument("--model-id", default=_env("MODEL_ID", None),
                   help="the served model id (default: the checkpoint directory's name)")
    p.add_argument("--model-alias", default=_env("MODEL_ALIASES", ""),
                   help="comma-separated other names requests may give as 'model'; any other name is "
                        "404 model_not_found (NOT_FOUND on the chat gRPC API)")
    p.add_argument("--rpc-timeout-s", type=float, default=float(_env("RPC_TIMEOUT_S", 600.0)),
                   help="deadline of a whole Encode and of the unary calls to encoders and decoders")
    p.add_argument("--stream-idle-timeout-s", type=float, default=float(_env("STREAM_IDLE_TIMEOUT_S", 60.0)),
                   help="a generation whose decoder sends nothing for this long between tokens is ended "
                        "(504 timeout); a generation is never cut for being long (max_tokens bounds it)")
    p.add_argument("--first-token-timeout-s", type=float, default=float(_env("FIRST_TOKEN_TIMEOUT_S", 600.0)),
                   help="a generation's first token (queueing and prefill) must come within this long")
    p.add_argument("--accept-timeout-s", type=float, default=float(_env("ACCEPT_TIMEOUT_S", 10.0)),
                   help="a decoder must accept a generation's setup within this long, else it counts as down "
                        "and the request goes to another replica (a partitioned host answers nothing)")
    p.add_argument("--reasoning", choices=["separate", "drop"], default=_env("REASONING", "separate"),
                   help="the model's thought channel: returned as reasoning_content, or dropped "
                        "(a request's include_reasoning overrides)")
    p.add_argument("--api-key", default=_env("API_KEY", None),
                   help="require 'Authorization: Bearer <key>' on /v1/* (unset = open)")
    p.add_argument("--transcription-instruction", default=_env("TRANSCRIPTION_INSTRUCTION", None),
                   help="the text sent with a clip to /v1/audio/transcriptions (default: Gemma's ASR prompt, "
                        "'Transcribe the following speech segment into text.'); used with or without a language")
    p.add_argument("--responses-store-bytes", type=int, default=int(_env("RESPONSES_STORE_BYTES", 64 << 20)),
                   help="memory for stored /v1/responses (previous_response_id, GET); least recently used go first")
    p.add_argument("--chat-store-bytes", type=int, default=int(_env("CHAT_STORE_BYTES", 64 << 20)),
                   help="memory for chat completions created with store: true (GET /v1/chat/completions); "
                        "least recently used go first")
    p.add_argument("--grpc-host", default=_env("GRPC_HOST", None),
                   help="bind address of the typed chat gRPC API (default: --host)")
    p.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", 50050)),
                   help="port of the typed chat gRPC API (mmserve.chat.v1); 0 = any free port, -1 = off")
    add_server_tls_args(p, "MMSERVE_GATEWAY")
    p.add_argument("--drain-grace-s", type=float, default=float(_env("DRAIN_GRACE_S", 30.0)),
                   help="on SIGTERM: stop accepting, let open requests and streams finish this long")


def _limit_args(p: argparse.ArgumentParser) -> None:
    """What a request may bring: body size, media, URLs to fetch."""
    p.add_argument("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", 64 << 20)))
    p.add_argument("--max-media-items", type=int, default=int(_env("MAX_MEDIA_ITEMS", 16)),
                   help="images + audio clips per request")
    p.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", 600.0)),
                   help="total audio duration per request")
    p.add_argument("--url-fetch", action="store_true", default=_env("URL_FETCH", "") in ("1", "true"),
                   help="fetch http(s) image_url URLs (off by default; needs --url-allowlist)")
    p.add_argument("--url-allowlist", default=_env("URL_ALLOWLIST", ""),
                   help="comma-separated hosts that may be fetched: exact names or *.suffix")
    p.add_argument("--url-max-bytes", type=int, default=int(_env("URL_MAX_BYTES", 20 << 20)))
    p.add_argument("--url-timeout-s", type=float, default=float(_env("URL_TIMEOUT_S", 10.0)))
    p.add_argument("--url-fetch-allow-private", action="store_true",
                   default=_env("URL_FETCH_ALLOW_PRIVATE", "") in ("1", "true"),
                   help="also fetch from private / loopback / link-local addresses (SSRF risk: only for "
                        "image hosts on a trusted private network)")



def _upstream_args(p: argparse.ArgumentParser) -> None:
    """How the gateway talks to its encoders and decoders."""
    p.add_argument("--upstream-ca", default=_env("UPSTREAM_CA", None),
                   help="PEM CA: talk TLS to encoders and decoders, verified against it")
    p.add_argument("--upstream-cert", default=_env("UPSTREAM_CERT", None),
                   help="PEM client certificate for services that require mutual TLS")
    p.add_argument("--upstream-key", default=_env("UPSTREAM_KEY", None))
    p.add_argument("--decoder-affinity", choices=["conversation", "none"],
                   default=_env("DECODER_AFFINITY", "conversation"),
                   help="with several decoders: send a conversation's turns to one of them (rendezvous hash "
                        "of its first user turn with what precedes it, within a load bound), so their prefix cache is "
                        "reused; 'none' = the least busy decoder")


def _config(a: argparse.Namespace) -> GatewayConfig:
    split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    instruction = {"transcription_instruction": a.transcription_instruction,  # one for every clip
                   "transcription_instruction_language": a.transcription_instruction} \
        if a.transcription_instruction else {}
    return GatewayConfig(
        checkpoint=a.checkpoint, encoder=a.encoder, decoder=a.decoder, host=a.host, port=a.port,
        model_id=a.model_id, rpc_timeout_s=a.rpc_timeout_s, stream_idle_timeout_s=a.stream_idle_timeout_s,
        first_token_timeout_s=a.first_token_timeout_s, accept_timeout_s=a.accept_timeout_s, reasoning=a.reasoning, api_key=a.api_key,
        max_body_bytes=a.max_body_bytes, max_media_items=a.max_media_items, max_audio_seconds=a.max_audio_seconds,
        url_fetch=a.url_fetch, url_allowlist=split(a.url_allowlist), url_max_bytes=a.url_max_bytes,
        url_timeout_s=a.url_timeout_s, url_fetch_allow_private=a.url_fetch_allow_private,
        grpc_host=a.grpc_host or a.host, grpc_port=None if a.grpc_port < 0 else a.grpc_port,
        tls=server_tls_from(a), upstream_tls=ClientTLS(a.upstream_ca, a.upstream_cert, a.upstream_key),
        drain_grace_s=a.drain_grace_s, decoder_affinity=a.decoder_affinity, model_aliases=split(a.model_alias),
        responses_store_bytes=a.responses_store_bytes, chat_store_bytes=a.chat_store_bytes, **instruction)

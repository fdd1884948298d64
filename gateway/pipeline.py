"""The request pipeline behind every front: validate media, encode, render, expand, decode.

Why: the HTTP handler should only parse and format; everything that talks to
the encoder and decoder, and the checks that need the model's facts (towers,
media limits), lives here.  grpc.aio channels are created in ``open`` (they
bind to the running loop).  Event-loop thread; no MLX.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time

import grpc
import soundfile as sf

from gateway.affinity import conversation_key, prompt_cache_key
from gateway.config import GatewayConfig
from gateway.errors import HTTPError, to_http
from gateway.events import Delta, Done
from gateway.logprobs import LogprobFormatter
from gateway.reasoning import ReasoningParser
from gateway.request import ChatRequest, check_towers
from gateway.tools.choice import ToolPlan, finish_reason, markers, plan_tools
from gateway.tools.parser import ToolCallParser
from gateway.upstream.clients import DecoderClient, DecoderStream, EncoderClient
from gateway.upstream.fetch import MediaFetcher
from mmserve_core.digests import template_digest, tokenizer_digest
from mmserve_core.prompt import PromptBuilder, PromptMedia, prompt_media, wants_track
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import CONSTRAINT_REFUSAL
from mmserve_core.wire.tensors import split_rows

log = get_logger(__name__)


class Generation:
    """A running generation as the typed events every front formats: ``Delta``s, then one ``Done``.

    The decoder's messages are turned into events here (thought channel split
    off, logprobs typed), so no front sees a protobuf message; a decoder
    failure mid-stream is raised as the ``HTTPError`` it maps to.
    ``cancel()`` stops the sequence (a client that went away)."""

    def __init__(self, stream: DecoderStream, prompt_ids: list[int], encode_ms: float,
                 tools: ToolPlan = ToolPlan(parse=False, close_id=None)) -> None:
        self._stream = stream
        self.prompt_ids, self.encode_ms = prompt_ids, encode_ms
        self._tools = tools

    async def events(self):
        """The thought channel is split off first, then tool calls out of the answer text: neither
        the thought nor a call's markup reaches ``content``, and a call never holds thought text."""
        parser = ReasoningParser()
        calls = ToolCallParser() if self._tools.parse else None
        try:
            async for ev in self._stream.events():
                if isinstance(ev, T.TokenEvent):
                    content, reasoning = parser.feed(ev.text)
                    deltas: list = []
                    if calls is not None:
                        content, deltas = calls.feed(content)
                    yield Delta(content, reasoning, list(ev.token_ids), list(ev.logprobs or ()), tuple(deltas))
                    continue
                made: tuple[T.ToolCall, ...] = ()
                if calls is not None:
                    closing = calls.close_call() if ev.stop_token_id == self._tools.close_id else []
                    rest = calls.finish()
                    if rest or closing:
                        yield Delta(rest, "", [], [], tuple(closing))
                    if calls.malformed:
                        log.warning("the model wrote a malformed tool call", malformed=calls.malformed)
                    made = tuple(calls.calls)
                yield Done(ev, self.encode_ms, self.prompt_ids, made, finish_reason(ev.finish_reason, len(made)))
        except grpc.aio.AioRpcError as e:
            raise to_http(e, upstream="decoder") from None

    def cancel(self) -> None:
        self._stream.cancel()

    def done(self) -> bool:
        return self._stream.done()


class Pipeline:
    """Request pipeline shared by every front: validate, encode, render, decode."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
        # a decoder is routed to only if it reads prompts as this gateway writes them (``replicas``)
        self.digests = (tokenizer_digest(self.tokenizer), template_digest(getattr(self.tokenizer, "chat_template", None)))
        # grpc.aio channels bind to the running loop: created in ``open()``.
        self.encoder: EncoderClient = None  # type: ignore[assignment]
        self.decoder: DecoderClient = None  # type: ignore[assignment]
        self._info: T.ModelInfo | None = None
        self._builder: PromptBuilder | None = None
        self._encoder_modalities: set[str] | None = None
        self.logprobs = LogprobFormatter(self.tokenizer)
        self.tool_markers = markers(self.tokenizer)
        self.fetcher = MediaFetcher(allowlist=list(cfg.url_allowlist), max_bytes=cfg.url_max_bytes,
                                    timeout_s=cfg.url_timeout_s, allow_private=cfg.url_fetch_allow_private)

    async def open(self, on_call=None) -> None:
        creds = self.cfg.upstream_tls.credentials()
        self.encoder = EncoderClient(self.cfg.encoder, self.cfg.rpc_timeout_s, creds)
        self.decoder = DecoderClient(self.cfg.decoder, self.cfg.rpc_timeout_s, creds,
                                     idle_timeout_s=self.cfg.stream_idle_timeout_s,
                                     first_token_timeout_s=self.cfg.first_token_timeout_s,
                                     accept_timeout_s=self.cfg.accept_timeout_s)
        self.decoder.replicas.expect = self.digests
        for c in (self.encoder, self.decoder):
            c.pool.on_call = on_call
            c.start()

    async def close(self) -> None:
        await self.encoder.close()
        await self.decoder.close()

    async def model_info(self, rid: str) -> tuple[T.ModelInfo, PromptBuilder]:
        if self._info is None or self._builder is None:
            try:
                info = await self.decoder.model_info(rid)
            except grpc.aio.AioRpcError as e:
                raise to_http(e, upstream="decoder") from None
            self._builder = PromptBuilder(self.tokenizer, info.media_tokens)
            self._info = info
        return self._info, self._builder

    @property
    def model_id(self) -> str:
        """``--model-id``, else this gateway's checkpoint directory's name: the same from the first
        request on (the decoders' own id is accepted as an alias once known)."""
        return self.cfg.model_id or self.cfg.checkpoint.rstrip("/").rsplit("/", 1)[-1]

    def keep_reasoning(self, req: ChatRequest) -> bool:
        """Whether the thought channel goes back to the client: the request's say, else ``--reasoning``."""
        return req.include_reasoning if req.include_reasoning is not None else self.cfg.reasoning == "separate"

    @property
    def served_models(self) -> tuple[str, ...]:
        """The model id, then the configured aliases (``--model-alias``), then the decoders' own id."""
        names = [self.model_id, *self.cfg.model_aliases]
        if self._info is not None:
            names.append(self._info.model_id)
        return tuple(dict.fromkeys(n for n in names if n))

    def check_model(self, name: str | None) -> None:
        """A request naming a model this gateway does not serve is 404 ``model_not_found``
        (OpenAI's and vLLM's answer), never served by whatever is loaded; no name = the model."""
        if name is not None and name not in self.served_models:
            served = ", ".join(f"'{m}'" for m in self.served_models)
            raise HTTPError(404, f"The model '{name}' does not exist; this server serves {served}",
                            type_="invalid_request_error", param="model", code="model_not_found")

    async def encoder_modalities(self, rid: str) -> set[str]:
        if self._encoder_modalities is None:
            try:
                self._encoder_modalities = await self.encoder.modalities(rid)
            except grpc.aio.AioRpcError as e:
                raise to_http(e, upstream="encoder") from None
        return self._encoder_modalities

    async def upstream_health(self) -> dict:
        """``grpc.health.v1`` status of each upstream ("UNREACHABLE" when it does not answer); the
        decoders SERVING only if one that serves may be routed to ("REFUSED" when every one that
        serves reads prompts differently), with each replica's state when there are several or one
        is refused."""
        pool = self.decoder.pool
        states = await asyncio.gather(*(pool.check(u) for u in pool.upstreams))
        await self.decoder.replicas.refresh()
        serving = [u for u, s in zip(pool.upstreams, states) if s == "SERVING"]
        decoder = "SERVING" if any(u.refused is None for u in serving) else "REFUSED" if serving else states[0]
        out: dict = {"encoder": await self.encoder.pool.health(), "decoder": decoder}
        if len(pool) > 1 or any(u.refused for u in pool.upstreams):
            out["decoders"] = self.decoder.replicas.status()
        return out

    async def fetch_urls(self, req: ChatRequest) -> None:
        """Fill in the bytes of http(s) image and video parts (only present when fetching is enabled)."""
        parts = [p for p in req.media if p.url is not None]
        if len(parts) > self.cfg.max_media_items:
            return  # check_limits refuses the request; fetch nothing for it
        bodies = await asyncio.gather(*(self.fetcher.fetch(p.url, p.url_param or p.param, p.media.modality)
                                        for p in parts))
        for p, (data, mime) in zip(parts, bodies):
            p.media = dataclasses.replace(p.media, data=data, mime_type=mime)

    def check_limits(self, req: ChatRequest) -> None:
        """Media count and total audio duration, before any media is sent anywhere."""
        parts = req.media
        if len(parts) > self.cfg.max_media_items:
            raise HTTPError(400, f"the request has {len(parts)} media parts, over the limit of "
                            f"{self.cfg.max_media_items}", type_="invalid_request_error", param="messages",
                            code="too_many_media_items")
        total = 0.0
        for p in parts:
            if p.media.modality == T.AUDIO:
                total += audio_seconds(p.media.data)
        if total > self.cfg.max_audio_seconds:
            raise HTTPError(400, f"the request's audio lasts {total:.2f} s in total, over the limit of "
                            f"{self.cfg.max_audio_seconds:g} s", type_="invalid_request_error", param="messages",
                            code="audio_too_long")

    async def start_generate(self, ids: list[int], spans: list[T.SpanEmbedding], req: ChatRequest, rid: str,
                             next_turn_at: int = 0):
        """Start the decoder's Generate (every front): its ``DecoderStream``, first message read.

        With several decoders, a conversation's turns prefer one of them
        (``--decoder-affinity conversation``), so turn 2 finds turn 1 in that
        decoder's prefix cache instead of recomputing it on another; a request's
        ``prompt_cache_key`` is that key when given (requests sharing it share a decoder).
        The service tier becomes the decoder's admission priority."""
        key = None
        if req.cache_key is not None:
            key = prompt_cache_key(req.cache_key)
        elif self.cfg.decoder_affinity == "conversation":
            key = conversation_key(req.messages, req.tools)
        return await self.decoder.start_generate(ids, spans, req.sampling, rid, affinity=key, priority=req.priority,
                                                 cache_point=next_turn_at, needs=needs(req))

    async def start(self, req: ChatRequest, rid: str) -> Generation:
        """Everything between a parsed request and its first event: model check, media,
        encode, prompt, Generate; errors as ``HTTPError`` (the upstream's code kept)."""
        # a tool-call grammar is built from the request's schemas: under a millisecond for most, over
        # 100 ms for the largest real-world ones (JSONSchemaBench) — a worker thread's time, not the
        # event loop's, which every other stream's next token waits behind (pure Python, no shared state)
        tools = await asyncio.to_thread(plan_tools, req, self.tool_markers) if req.tools else \
            plan_tools(req, self.tool_markers)
        ids, spans, encode_ms, next_turn_at = await self.prepare(req, rid)
        try:
            stream = await self.start_generate(ids, spans, req, rid, next_turn_at)
        except grpc.aio.AioRpcError as e:
            err = to_http(e, upstream="decoder")
            if err.status == 400 and err.message.startswith(CONSTRAINT_REFUSAL):
                err.param = req.constraint_param  # the decoder could not enforce the request's constraint
            raise err from None
        if stream.empty:
            raise HTTPError(502, "decoder closed the stream without a response", type_="server_error",
                            code="upstream_incomplete")
        return Generation(stream, ids, encode_ms, tools)

    async def prepare(self, req: ChatRequest, rid: str):
        """Encode media and build ``(ids, span embeddings, encode ms, where the next turn departs)`` for
        the decoder."""
        self.check_model(req.model)
        await self.fetch_urls(req)
        self.check_limits(req)
        info, builder = await self.model_info(rid)
        check_towers(req.messages, set(builder.media_tokens))
        rendered = builder.render(req.messages, tools=req.tools, **req.chat_template_kwargs)
        media_parts = req.media
        if media_parts and req.truncation != "auto":
            check_text_fits(builder, rendered, req, info.context_length)  # before the encoder's work
        encoded: list[T.EncodedItem] = []
        t0 = time.perf_counter()
        if media_parts:
            check_towers(req.messages, await self.encoder_modalities(rid), owner="the model's encoder")
            try:
                encoded = await self.encoder.encode([p.media for p in media_parts], info.dtype, rid)
            except grpc.aio.AioRpcError as e:
                err = to_http(e, upstream="encoder")
                param = _param_from_items(err.message, media_parts)
                if param:
                    err.param = param
                    err.message = param + err.message[err.message.find(":"):]
                raise err from None
        encode_ms = (time.perf_counter() - t0) * 1000.0
        by_part = {id(p): e for p, e in zip(media_parts, encoded)}
        messages = req.messages
        while True:
            kept = [by_part[id(p)] for m in messages for p in m.parts if p.media is not None]
            parts = [p for m in messages for p in m.parts if p.media is not None]
            built = builder.build(rendered, [m for e, p in zip(kept, parts) for m in prompt_media(p, e)])
            if req.truncation != "auto" or _fits(len(built.ids), req.sampling.max_tokens, info.context_length):
                break
            shorter = drop_oldest_turn(messages)
            if shorter is None:  # only the last turn is left: the decoder refuses it with the lengths
                break
            messages = shorter
            rendered = builder.render(messages, tools=req.tools, **req.chat_template_kwargs)
        if messages is not req.messages:
            log.info("truncated the conversation to fit the context", dropped_messages=len(req.messages) - len(messages),
                     prompt_tokens=len(built.ids))
            req.messages = messages
        block_tensors = [t for e in kept for t in split_rows(e.tensor, e.block_rows)]
        spans = [T.SpanEmbedding(s, t) for s, t in zip(built.spans, block_tensors, strict=True)]
        return built.ids, spans, encode_ms, built.next_turn_at


def check_text_fits(builder: PromptBuilder, rendered, req: ChatRequest, context_length: int) -> None:
    """The prompt's tokens without its media rows, plus ``max_tokens``, within the context: a prompt
    that cannot fit is refused before its media are sent to the encoder (400
    ``context_length_exceeded``, as the decoder would refuse it after)."""
    media = []
    for p in (p for m in req.messages for p in m.parts if p.media is not None):
        media.append(PromptMedia(p.media.modality, p.param, (), ""))
        if wants_track(p):
            media.append(PromptMedia(T.AUDIO, p.param, (), ""))
    n = len(builder.build(rendered, media).ids)
    if not _fits(n, req.sampling.max_tokens, context_length):
        raise HTTPError(400, f"the prompt's text alone is {n} tokens (before its media), which with max_tokens "
                        f"({req.sampling.max_tokens or 1}) exceeds the context length of {context_length}",
                        type_="invalid_request_error", param="messages", code="context_length_exceeded")


def needs(req: ChatRequest) -> dict[str, str]:
    """The decoder capabilities this request needs, each with the field (as the client's API names
    it) that needs it: only replicas declaring them get it (``upstream.replicas``)."""
    out: dict[str, str] = {}
    s = req.sampling
    if s.constraint is not None:
        out["constraints"] = req.constraint_param
    if s.reasoning_budget is not None:
        out["thought_budget"] = "the reasoning budget"
    if s.logprobs:
        out["logprobs"] = "logprobs"
    if req.priority != "default":
        out["priority"] = f"service_tier {req.service_tier!r}"
    video = next((p for p in req.media if p.media.modality == T.VIDEO), None)
    if video is not None:
        out["video"] = video.param
    return out


def _fits(prompt_tokens: int, max_tokens: int | None, context_length: int) -> bool:
    """Whether the prompt leaves room for the reply (``max_tokens`` of it, or one token)."""
    return prompt_tokens + (max_tokens or 1) <= context_length


def drop_oldest_turn(messages: list[T.Message]) -> list[T.Message] | None:
    """``truncation: "auto"``, as OpenAI documents it: the conversation without its oldest turn —
    system / developer messages kept, the first remaining message dropped, then whatever cannot open a
    conversation (assistant replies, tool results: a result without its call would be refused) up to
    the next user message.  None when no user message would remain."""
    turns = [i for i, m in enumerate(messages) if m.role not in ("system", "developer")]
    j = 1
    while j < len(turns) and messages[turns[j]].role != "user":
        j += 1
    if j >= len(turns):
        return None
    drop = set(turns[:j])
    return [m for i, m in enumerate(messages) if i not in drop]


def _param_from_items(message: str, parts) -> str | None:
    """Rewrite the encoder's ``items[i]`` into the request's part path (a video's options: where the
    client set them, e.g. ``messages[0].content[1].video_url.audio_track``)."""
    if message.startswith("items["):
        idx = message[6 : message.find("]")]
        if idx.isdigit() and int(idx) < len(parts):
            part = parts[int(idx)]
            rest = message[message.find("]") + 1 :]
            if rest.startswith(".video.") and part.options_param:
                return part.options_param + "." + rest[len(".video.") :].split(":")[0]
            if "audio track" in rest and part.options_param:
                return f"{part.options_param}.audio_track"
            return part.param
    return None




def audio_seconds(data: bytes) -> float:
    """Duration from the file header (no decoding); 0 if unreadable — the encoder then
    reports what is wrong with the bytes."""


    try:
        info = sf.info(io.BytesIO(data))
        return float(info.frames) / float(info.samplerate) if info.samplerate > 0 else 0.0
    except (RuntimeError, ValueError, TypeError):
        return 0.0

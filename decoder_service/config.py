"""Decoder settings: command-line flags with ``MMSERVE_DECODER_*`` env defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mmserve_core.runtime.service_main import (
    ServiceSettings,
    add_service_tail_args,
    common_settings,
    service_parser,
)


@dataclass(frozen=True)
class DecoderConfig(ServiceSettings):
    port: int = 50052
    max_queue: int = 64
    max_active: int = 16
    prefix_cache_bytes: int = 2 << 30
    mlx_cache_bytes: int | None = None
    context_length: int | None = None
    stream_interval_ms: float = 10.0
    max_open_streams: int = 256
    max_buffered_bytes: int = 1 << 30
    stream_idle_timeout_s: float = 30.0
    prefill_budget_tokens: int = 512
    kv_bits: int | None = None


def parse_args(argv: list[str] | None = None) -> DecoderConfig:
    p, env = service_parser("decoder", 50052, "checkpoint directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--max-queue", type=int, default=int(env("MAX_QUEUE", 64)),
                   help="requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-active", type=int, default=int(env("MAX_ACTIVE", 16)),
                   help="sequences decoding together in one batch")
    p.add_argument("--prefix-cache-bytes", type=int, default=int(env("PREFIX_CACHE_BYTES", 2 << 30)),
                   help="KV bytes kept for prefix reuse across turns and requests (0 = off)")
    p.add_argument("--mlx-cache-bytes", type=int, default=env("MLX_CACHE_BYTES", None),
                   help="bound MLX's cache of freed buffers (mx.set_cache_limit); unset = MLX's default")
    p.add_argument("--context-length", type=int, default=env("CONTEXT_LENGTH", None),
                   help="cap the context below the checkpoint's max_position_embeddings")
    p.add_argument("--stream-interval-ms", type=float, default=float(env("STREAM_INTERVAL_MS", 10.0)),
                   help="least time between two token messages of one stream; tokens generated "
                        "in between travel together (0 = one message per token)")
    p.add_argument("--max-open-streams", type=int, default=int(env("MAX_OPEN_STREAMS", 256)),
                   help="Generate RPCs open at once, sending or generating; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-buffered-bytes", type=int, default=int(env("MAX_BUFFERED_BYTES", 1 << 30)),
                   help="embedding bytes that streams still sending may hold together (reserved from each "
                        "setup's declared spans); beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--stream-idle-timeout-s", type=float, default=float(env("STREAM_IDLE_TIMEOUT_S", 30.0)),
                   help="a Generate stream that sends nothing this long before closing its side ends with "
                        "DEADLINE_EXCEEDED and frees what it buffered")
    p.add_argument("--prefill-budget-tokens", type=int, default=int(env("PREFILL_BUDGET_TOKENS", 512)),
                   help="prompt tokens prefilled per decode step while other sequences decode (chunked "
                        "prefill: bounds how long a long or a burst of prompts delays running streams)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=env("KV_BITS", None),
                   help="store the prefix cache's KV quantized to 4 or 8 bits (mlx-lm's QuantizedKVCache): "
                        "~0.28x / 0.53x the bytes of bf16, so the same --prefix-cache-bytes keeps more "
                        "conversations; the running batch stays full precision")
    add_service_tail_args(p, "decoder")
    a = p.parse_args(argv)
    return DecoderConfig(
        **common_settings(a),
        max_queue=a.max_queue,
        max_active=a.max_active,
        prefix_cache_bytes=a.prefix_cache_bytes,
        mlx_cache_bytes=int(a.mlx_cache_bytes) if a.mlx_cache_bytes is not None else None,
        context_length=int(a.context_length) if a.context_length else None,
        stream_interval_ms=a.stream_interval_ms,
        max_open_streams=a.max_open_streams,
        max_buffered_bytes=a.max_buffered_bytes,
        stream_idle_timeout_s=a.stream_idle_timeout_s,
        prefill_budget_tokens=max(1, a.prefill_budget_tokens),
        kv_bits=int(a.kv_bits) if a.kv_bits else None,
    )

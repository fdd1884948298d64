"""Decoder settings: command-line flags with ``MMSERVE_DECODER_*`` env defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from mmserve_core.runtime.service_main import add_drain_args
from mmserve_core.runtime.tls import ServerTLS, add_server_tls_args, server_tls_from


@dataclass(frozen=True)
class DecoderConfig:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 50052
    model_id: str | None = None
    max_queue: int = 64
    max_active: int = 16
    prefix_cache_bytes: int = 2 << 30
    mlx_cache_bytes: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    drain_grace_s: float = 30.0
    drain_delay_s: float = 0.0
    tls: ServerTLS = field(default_factory=ServerTLS)
    context_length: int | None = None
    stream_interval_ms: float = 10.0
    max_open_streams: int = 256
    max_buffered_bytes: int = 1 << 30
    stream_idle_timeout_s: float = 30.0


def _env(name: str, default):
    return os.environ.get(f"MMSERVE_DECODER_{name}", default)


def parse_args(argv: list[str] | None = None) -> DecoderConfig:
    p = argparse.ArgumentParser(prog="mmserve-decoder", description="mmserve decoder service")
    p.add_argument("--checkpoint", default=_env("CHECKPOINT", None), required=_env("CHECKPOINT", None) is None,
                   help="checkpoint directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 50052)), help="0 = pick a free port")
    p.add_argument("--model-id", default=_env("MODEL_ID", None))
    p.add_argument("--max-queue", type=int, default=int(_env("MAX_QUEUE", 64)),
                   help="requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-active", type=int, default=int(_env("MAX_ACTIVE", 16)),
                   help="sequences decoding together in one batch")
    p.add_argument("--prefix-cache-bytes", type=int, default=int(_env("PREFIX_CACHE_BYTES", 2 << 30)),
                   help="KV bytes kept for prefix reuse across turns and requests (0 = off)")
    p.add_argument("--mlx-cache-bytes", type=int, default=_env("MLX_CACHE_BYTES", None),
                   help="bound MLX's cache of freed buffers (mx.set_cache_limit); unset = MLX's default")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"))
    p.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", None),
                   help="serve Prometheus /metrics on this port (0 = any free port; unset = off)")
    p.add_argument("--context-length", type=int, default=_env("CONTEXT_LENGTH", None),
                   help="cap the context below the checkpoint's max_position_embeddings")
    p.add_argument("--stream-interval-ms", type=float, default=float(_env("STREAM_INTERVAL_MS", 10.0)),
                   help="least time between two token messages of one stream; tokens generated "
                        "in between travel together (0 = one message per token)")
    p.add_argument("--max-open-streams", type=int, default=int(_env("MAX_OPEN_STREAMS", 256)),
                   help="Generate RPCs open at once, sending or generating; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-buffered-bytes", type=int, default=int(_env("MAX_BUFFERED_BYTES", 1 << 30)),
                   help="embedding bytes that streams still sending may hold together (reserved from each "
                        "setup's declared spans); beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--stream-idle-timeout-s", type=float, default=float(_env("STREAM_IDLE_TIMEOUT_S", 30.0)),
                   help="a Generate stream that sends nothing this long before closing its side ends with "
                        "DEADLINE_EXCEEDED and frees what it buffered")
    add_drain_args(p, "MMSERVE_DECODER")
    add_server_tls_args(p, "MMSERVE_DECODER")
    a = p.parse_args(argv)
    return DecoderConfig(
        checkpoint=a.checkpoint,
        host=a.host,
        port=a.port,
        model_id=a.model_id,
        max_queue=a.max_queue,
        context_length=int(a.context_length) if a.context_length else None,
        stream_interval_ms=a.stream_interval_ms,
        max_open_streams=a.max_open_streams,
        max_buffered_bytes=a.max_buffered_bytes,
        stream_idle_timeout_s=a.stream_idle_timeout_s,
        max_active=a.max_active,
        prefix_cache_bytes=a.prefix_cache_bytes,
        mlx_cache_bytes=int(a.mlx_cache_bytes) if a.mlx_cache_bytes is not None else None,
        metrics_host=a.metrics_host,
        metrics_port=int(a.metrics_port) if a.metrics_port is not None else None,
        drain_grace_s=a.drain_grace_s,
        drain_delay_s=a.drain_delay_s,
        tls=server_tls_from(a),
    )

"""Encoder settings: command-line flags with ``MMSERVE_ENCODER_*`` env defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from mmserve_core.runtime.service_main import add_drain_args
from mmserve_core.runtime.tls import ServerTLS, add_server_tls_args, server_tls_from


@dataclass(frozen=True)
class EncoderConfig:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 50051
    model_id: str | None = None
    max_queue: int = 64
    max_pending: int = 256
    max_batch: int = 8
    max_image_pixels: int = 50_000_000
    max_audio_seconds: float = 600.0
    max_items: int = 32
    chunk_bytes: int = 1 << 20
    cache_bytes: int = 512 << 20
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    drain_grace_s: float = 30.0
    drain_delay_s: float = 0.0
    tls: ServerTLS = field(default_factory=ServerTLS)


def _env(name: str, default):
    return os.environ.get(f"MMSERVE_ENCODER_{name}", default)


def parse_args(argv: list[str] | None = None) -> EncoderConfig:
    p = argparse.ArgumentParser(prog="mmserve-encoder", description="mmserve encoder service")
    p.add_argument("--checkpoint", default=_env("CHECKPOINT", None), required=_env("CHECKPOINT", None) is None,
                   help="checkpoint directory (config.json, safetensors, processor files)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 50051)), help="0 = pick a free port")
    p.add_argument("--model-id", default=_env("MODEL_ID", None))
    p.add_argument("--max-pending", type=int, default=int(_env("MAX_PENDING", 256)),
                   help="tower inputs (images, audio blocks) allowed to wait; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", 8)),
                   help="most tower inputs in one forward pass")
    p.add_argument("--max-image-pixels", type=int, default=int(_env("MAX_IMAGE_PIXELS", 50_000_000)),
                   help="decompression-bomb guard: images with more pixels are refused before decoding")
    p.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", 600.0)),
                   help="longest clip accepted; clips over one block (30 s) become consecutive blocks")
    p.add_argument("--max-items", type=int, default=int(_env("MAX_ITEMS", 32)))
    p.add_argument("--chunk-bytes", type=int, default=int(_env("CHUNK_BYTES", 1 << 20)))
    p.add_argument("--cache-bytes", type=int, default=int(_env("CACHE_BYTES", 512 << 20)),
                   help="embedding cache size in bytes (0 = off)")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"))
    p.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", None),
                   help="serve Prometheus /metrics on this port (0 = any free port; unset = off)")
    add_drain_args(p, "MMSERVE_ENCODER")
    add_server_tls_args(p, "MMSERVE_ENCODER")
    a = p.parse_args(argv)
    return EncoderConfig(
        checkpoint=a.checkpoint,
        host=a.host,
        port=a.port,
        model_id=a.model_id,
        max_pending=a.max_pending,
        max_batch=a.max_batch,
        max_image_pixels=a.max_image_pixels,
        max_audio_seconds=a.max_audio_seconds,
        max_items=a.max_items,
        chunk_bytes=a.chunk_bytes,
        cache_bytes=a.cache_bytes,
        metrics_host=a.metrics_host,
        metrics_port=int(a.metrics_port) if a.metrics_port is not None else None,
        drain_grace_s=a.drain_grace_s,
        drain_delay_s=a.drain_delay_s,
        tls=server_tls_from(a),
    )

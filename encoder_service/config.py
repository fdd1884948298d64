"""Encoder settings: command-line flags with ``MMSERVE_ENCODER_*`` env defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mmserve_core.runtime.service_main import (
    ServiceSettings,
    add_service_tail_args,
    common_settings,
    service_parser,
)


@dataclass(frozen=True)
class EncoderConfig(ServiceSettings):
    port: int = 50051
    max_queue: int = 64
    max_pending: int = 256
    max_batch: int = 8
    max_image_pixels: int = 50_000_000
    max_audio_seconds: float = 600.0
    max_items: int = 32
    chunk_bytes: int = 1 << 20
    cache_bytes: int = 512 << 20


def parse_args(argv: list[str] | None = None) -> EncoderConfig:
    p, env = service_parser("encoder", 50051, "checkpoint directory (config.json, safetensors, processor files)")
    p.add_argument("--max-pending", type=int, default=int(env("MAX_PENDING", 256)),
                   help="tower inputs (images, audio blocks) allowed to wait; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-batch", type=int, default=int(env("MAX_BATCH", 8)),
                   help="most tower inputs in one forward pass")
    p.add_argument("--max-image-pixels", type=int, default=int(env("MAX_IMAGE_PIXELS", 50_000_000)),
                   help="decompression-bomb guard: images with more pixels are refused before decoding")
    p.add_argument("--max-audio-seconds", type=float, default=float(env("MAX_AUDIO_SECONDS", 600.0)),
                   help="longest clip accepted; clips over one block (30 s) become consecutive blocks")
    p.add_argument("--max-items", type=int, default=int(env("MAX_ITEMS", 32)))
    p.add_argument("--chunk-bytes", type=int, default=int(env("CHUNK_BYTES", 1 << 20)))
    p.add_argument("--cache-bytes", type=int, default=int(env("CACHE_BYTES", 512 << 20)),
                   help="embedding cache size in bytes (0 = off)")
    add_service_tail_args(p, "encoder")
    a = p.parse_args(argv)
    return EncoderConfig(**common_settings(a), max_pending=a.max_pending, max_batch=a.max_batch,
                         max_image_pixels=a.max_image_pixels, max_audio_seconds=a.max_audio_seconds,
                         max_items=a.max_items, chunk_bytes=a.chunk_bytes, cache_bytes=a.cache_bytes)

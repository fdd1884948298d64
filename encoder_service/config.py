"""Encoder settings: command-line flags with ``MMSERVE_ENCODER_*`` env defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 50051
    model_id: str | None = None
    max_queue: int = 64
    max_image_pixels: int = 50_000_000
    max_audio_seconds: float = 30.0
    max_items: int = 32
    chunk_bytes: int = 1 << 20


def _env(name: str, default):
    return os.environ.get(f"MMSERVE_ENCODER_{name}", default)


def parse_args(argv: list[str] | None = None) -> EncoderConfig:
    p = argparse.ArgumentParser(prog="mmserve-encoder", description="mmserve encoder service")
    p.add_argument("--checkpoint", default=_env("CHECKPOINT", None), required=_env("CHECKPOINT", None) is None,
                   help="checkpoint directory (config.json, safetensors, processor files)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 50051)), help="0 = pick a free port")
    p.add_argument("--model-id", default=_env("MODEL_ID", None))
    p.add_argument("--max-queue", type=int, default=int(_env("MAX_QUEUE", 64)))
    p.add_argument("--max-image-pixels", type=int, default=int(_env("MAX_IMAGE_PIXELS", 50_000_000)))
    p.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", 30.0)),
                   help="longest clip accepted (Gemma 4's audio block holds 30 s)")
    p.add_argument("--max-items", type=int, default=int(_env("MAX_ITEMS", 32)))
    p.add_argument("--chunk-bytes", type=int, default=int(_env("CHUNK_BYTES", 1 << 20)))
    a = p.parse_args(argv)
    return EncoderConfig(
        checkpoint=a.checkpoint,
        host=a.host,
        port=a.port,
        model_id=a.model_id,
        max_queue=a.max_queue,
        max_image_pixels=a.max_image_pixels,
        max_audio_seconds=a.max_audio_seconds,
        max_items=a.max_items,
        chunk_bytes=a.chunk_bytes,
    )

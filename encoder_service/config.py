"""Encoder settings: command-line flags with ``MMSERVE_ENCODER_*`` env defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mmserve_core.runtime.flags import flag
from mmserve_core.runtime.service_main import ServiceSettings, parse_service_args


@dataclass(frozen=True)
class EncoderConfig(ServiceSettings):
    port: int = 50051
    max_queue: int = flag(64, "encode requests waiting for the MLX thread; beyond it RESOURCE_EXHAUSTED")
    max_pending: int = flag(256, "tower inputs (images, audio blocks) allowed to wait; beyond it "
                                 "RESOURCE_EXHAUSTED")
    max_batch: int = flag(8, "most tower inputs in one forward pass", minimum=1)
    max_image_pixels: int = flag(50_000_000, "decompression-bomb guard: images with more pixels are refused "
                                             "before decoding")
    max_audio_seconds: float = flag(600.0, "longest clip accepted; clips over one block (30 s) become "
                                           "consecutive blocks")
    max_video_seconds: float = flag(600.0, "longest video accepted (declared or decoded)")
    max_video_pixels: int = flag(3840 * 2160, "largest video frame accepted, in pixels, as the stream declares it")
    max_video_bytes: int = flag(64 << 20, "largest video file accepted")
    max_video_source_frames: int = flag(36_000, "most frames a video's stream may hold (600 s at 60 fps)")
    max_video_decode_s: float = flag(60.0, "wall-clock bound on demuxing and decoding one video; a video "
                                           "that takes longer is refused")
    max_items: int = flag(32, "media items in one Encode request")
    chunk_bytes: int = flag(1 << 20, "bytes of embedding in one streamed chunk", minimum=1)
    cache_bytes: int = flag(512 << 20, "embedding cache size in bytes (0 = off)")


def parse_args(argv: list[str] | None = None) -> EncoderConfig:
    return parse_service_args(EncoderConfig, "encoder", "checkpoint directory (config.json, safetensors, processor files)", argv)

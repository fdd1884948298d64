"""Decode and validate media bytes: images to RGB, audio to mono float32 at the model rate.

Why: every way media can be unusable (not an image, truncated, empty, too
long) must become a clear ``InvalidArgument`` before any tower work, never a
silently dropped or cut item.  Audio is resampled with ``soxr`` (libsoxr's
VHQ polyphase resampler: a maintained, well-tested library, much better than
naive interpolation) to the feature extractor's rate *before* the soft-token
count is computed, so placeholder counts match the encoder rows.

CPU-only and thread-safe (numpy / PIL / soundfile); runs in the event loop's
default executor, never on the MLX thread.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps, UnidentifiedImageError

from mmserve_common.errors import InvalidArgument

ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32 mono at ``sample_rate``
    sample_rate: int
    source_rate: int
    duration_s: float


def decode_image(data: bytes, *, what: str, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image (EXIF orientation applied)."""
    if not data:
        raise InvalidArgument(f"{what}: image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ALLOWED_IMAGE_FORMATS:
                raise InvalidArgument(
                    f"{what}: unsupported image format {fmt}; send PNG, JPEG, WebP, GIF or BMP"
                )
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidArgument(
                    f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}"
                )
            img.load()  # forces a full decode: truncated files fail here
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{what}: bytes are not a decodable image ({e})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    return img


def decode_audio(
    data: bytes, *, what: str, target_rate: int, max_seconds: float
) -> DecodedAudio:
    """Decode WAV/FLAC (anything libsndfile reads) to mono float32 at ``target_rate``."""
    if not data:
        raise InvalidArgument(f"{what}: audio is empty (0 bytes)")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise InvalidArgument(f"{what}: bytes are not decodable audio ({e}); send WAV or FLAC") from None
    if rate <= 0:
        raise InvalidArgument(f"{what}: audio declares a sample rate of {rate} Hz")
    if samples.shape[0] == 0:
        raise InvalidArgument(f"{what}: audio has no samples (duration 0 s)")
    duration = samples.shape[0] / rate
    if duration > max_seconds:
        raise InvalidArgument(
            f"{what}: audio is {duration:.2f} s long, over the limit of {max_seconds:g} s"
        )
    if not np.all(np.isfinite(samples)):
        raise InvalidArgument(f"{what}: audio contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="VHQ").astype(np.float32)
    if mono.size == 0:
        raise InvalidArgument(f"{what}: audio is too short to resample ({samples.shape[0]} samples)")
    return DecodedAudio(mono, target_rate, int(rate), duration)


def audio_soft_tokens(num_samples: int, sample_rate: int, ms_per_token: float) -> int:
    """Gemma 4's placeholder count for a clip: ceil(duration_ms / ms_per_token)."""
    return math.ceil(num_samples / sample_rate * 1000.0 / ms_per_token)

"""Decode and validate media bytes: images to 8-bit RGB, audio to mono float32 at the model rate.

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
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, UnidentifiedImageError

from mmserve_core.wire.errors import InvalidArgument

ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
# libsndfile major formats we accept (soundfile >= 0.12 bundles libsndfile 1.2 with MP3 on every platform).
ALLOWED_AUDIO_FORMATS = {"WAV": "WAV", "WAVEX": "WAV", "RF64": "WAV", "W64": "WAV", "FLAC": "FLAC",
                         "OGG": "OGG", "MP3": "MP3"}


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32 mono at ``sample_rate``
    sample_rate: int
    source_rate: int
    duration_s: float
    source_format: str
    channels: int


# --------------------------------------------------------------------------- images
def decode_image(data: bytes, *, what: str, max_pixels: int) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image (EXIF orientation applied).

    The first frame of an animated GIF/WebP is used.  Alpha is composited on
    white (what a viewer shows), palette and CMYK go through Pillow's
    conversions, and 16-bit / 32-bit integer greyscale is *scaled* to 8 bits —
    Pillow's own ``convert("RGB")`` clips it, turning most images white.
    """
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
            if w <= 0 or h <= 0:
                raise InvalidArgument(f"{what}: image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise InvalidArgument(
                    f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}"
                )
            img.load()  # forces a full decode of frame 0: truncated files fail here
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, struct.error,
        # TypeError, IndexError, ... on bad bytes: every one of them means "not a decodable image"
        if isinstance(e, UnidentifiedImageError | Image.DecompressionBombError | Image.DecompressionBombWarning):
            detail = str(e)
        else:
            detail = f"{type(e).__name__}: {e}"
        raise InvalidArgument(f"{what}: bytes are not a decodable {_fmt_hint(data)}image ({detail})") from None
    return to_rgb8(apply_exif_orientation(img, what))


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright (Pillow's own table).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ORIENTATION_TAG = 0x0112


def apply_exif_orientation(img: Image.Image, what: str) -> Image.Image:
    """Turn the pixels the way the EXIF orientation tag says, reading nothing else of the EXIF.

    Why not ``ImageOps.exif_transpose``: it also rewrites the whole EXIF block,
    so any other malformed tag (StripOffsets stored as text, a bad count) made
    it raise ``struct.error`` / ``TypeError`` — a 500 for an image whose pixels
    and orientation are fine.  Only the orientation matters to the tower.  An
    EXIF block too corrupt to read the orientation from, or an orientation
    outside 1-8, is refused: which way up the picture goes is then unknown.
    """
    try:
        exif = img.getexif()
        value = exif.get(_ORIENTATION_TAG) if exif else None
    except Exception as e:  # noqa: BLE001 - Pillow's EXIF parser raises many types on bad bytes
        raise InvalidArgument(f"{what}: the image's EXIF metadata is unreadable ({type(e).__name__}: {e}); "
                              "re-save it without EXIF") from None
    if value is None or value == 1:
        return img
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value not in _ORIENTATION:
        raise InvalidArgument(f"{what}: the image's EXIF orientation is {value!r}, not one of 1-8; "
                              "re-save it without EXIF or with a valid orientation")
    return img.transpose(_ORIENTATION[value])


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr8 = np.clip(np.nan_to_num(arr, nan=0.0) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255)
        elif mode == "I" and arr.max(initial=0) <= 255:
            arr8 = np.clip(arr, 0, 255)
        else:  # 16-bit samples (PNG stores greyscale 16-bit as I;16 or I)
            arr8 = np.clip(arr, 0, 65535).astype(np.uint32) // 257
        return Image.fromarray(arr8.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) or (
        mode in ("L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (Pillow inverts Adobe CMYK JPEGs), YCbCr, LAB, HSV


def _fmt_hint(data: bytes) -> str:
    for magic, name in ((b"\x89PNG", "PNG "), (b"\xff\xd8", "JPEG "), (b"GIF8", "GIF "), (b"BM", "BMP ")):
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP "
    return ""


# --------------------------------------------------------------------------- audio
def decode_audio(data: bytes, *, what: str, target_rate: int, max_seconds: float) -> DecodedAudio:
    """Decode WAV/FLAC/OGG-Vorbis/MP3 to mono float32 at ``target_rate``.

    Refuses, with the reason: empty bytes, undecodable or truncated files
    (a WAV whose data chunk is shorter than its header says; a FLAC that
    loses sync), zero samples, NaN/inf samples, and clips longer than
    ``max_seconds``.  Channels are averaged; the rate is converted with soxr.
    """
    if not data:
        raise InvalidArgument(f"{what}: audio is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt, rate, channels, declared = f.format, f.samplerate, f.channels, f.frames
            if fmt not in ALLOWED_AUDIO_FORMATS:
                raise InvalidArgument(
                    f"{what}: unsupported audio format {fmt}; send WAV, FLAC, OGG/Vorbis or MP3"
                )
            if rate <= 0:
                raise InvalidArgument(f"{what}: audio declares a sample rate of {rate} Hz")
            if declared > 0 and declared / rate > max_seconds * 1.01 + 1:
                raise _too_long(what, declared / rate, max_seconds)
            samples = f.read(dtype="float32", always_2d=True)
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - libsndfile (via soundfile) on bad bytes: never a bug of ours
        raise InvalidArgument(
            f"{what}: bytes are not decodable audio ({e}); send WAV, FLAC, OGG/Vorbis or MP3"
        ) from None
    if fmt in ("WAV", "WAVEX"):
        missing = _wav_missing_bytes(data)
        if missing > 0:
            raise InvalidArgument(
                f"{what}: WAV file is truncated: its data chunk is {missing} bytes shorter than its header says"
            )
    if fmt == "FLAC" and declared > 0 and samples.shape[0] < declared:
        raise InvalidArgument(
            f"{what}: FLAC file is truncated: {samples.shape[0]} of {declared} declared samples decoded"
        )
    if samples.shape[0] == 0:
        raise InvalidArgument(f"{what}: audio has no samples (duration 0 s)")
    duration = samples.shape[0] / rate
    if duration > max_seconds:
        raise _too_long(what, duration, max_seconds)
    if not np.all(np.isfinite(samples)):
        raise InvalidArgument(f"{what}: audio contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="VHQ").astype(np.float32)
    if mono.size == 0:
        raise InvalidArgument(f"{what}: audio is too short to resample ({samples.shape[0]} samples)")
    return DecodedAudio(mono, target_rate, int(rate), duration, ALLOWED_AUDIO_FORMATS[fmt], int(channels))


def _too_long(what: str, duration: float, limit: float) -> InvalidArgument:
    return InvalidArgument(f"{what}: audio is {duration:.2f} s long, over the limit of {limit:g} s")


def _wav_missing_bytes(data: bytes) -> int:
    """Bytes missing from a RIFF WAV's ``data`` chunk (0 if complete or not parseable).

    libsndfile silently returns the samples that are there when a WAV is cut
    short; a cut upload must be an error, not a shorter clip.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"data":
            if size == 0xFFFFFFFF:  # streaming writers: size unknown
                return 0
            return max(0, body + size - len(data))
        pos = body + size + (size & 1)
    return 0


def audio_soft_tokens(num_samples: int, sample_rate: int, ms_per_token: float) -> int:
    """Gemma 4's placeholder count for a clip: ceil(duration_ms / ms_per_token)."""
    return math.ceil(num_samples / sample_rate * 1000.0 / ms_per_token)


def split_blocks(num_samples: int, block_samples: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` sample ranges of at most ``block_samples`` each.

    Gemma 4's audio block holds 30 s (750 soft tokens); a longer clip becomes
    several blocks that stay together, in order, in the prompt — never a cut.
    """
    if num_samples <= 0:
        return []
    return [(s, min(s + block_samples, num_samples)) for s in range(0, num_samples, block_samples)]

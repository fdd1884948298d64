"""Every accepted media format decodes to what it holds (reference waveforms and pixel arrays).

Files are generated here with soundfile (libsndfile: WAV, FLAC, OGG/Vorbis and
MP3 writers) and Pillow, from a known signal / picture, and the decoder's
output is compared against that reference — resampled with the same
resampler for audio, pixel by pixel for images.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
import soxr
from PIL import Image

from encoder_service.media import decode_audio, decode_image, split_blocks
from mmserve_core.wire.errors import InvalidArgument
from tests.helpers import exif_block

TARGET = 16000


def _signal(rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t + 0.3)
    x = x.astype(np.float32)
    if channels > 1:  # different content per channel, so the downmix is checked
        x = np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1)
    return x


def _encode(x: np.ndarray, rate: int, fmt: str, subtype: str | None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _reference(x: np.ndarray, rate: int) -> np.ndarray:
    mono = x.mean(axis=1) if x.ndim == 2 else x
    return soxr.resample(mono.astype(np.float32), rate, TARGET, quality="VHQ")


LOSSLESS = [("WAV", "PCM_16", 2e-3), ("WAV", "PCM_24", 1e-4), ("WAV", "PCM_32", 1e-4), ("WAV", "FLOAT", 1e-5),
            ("FLAC", "PCM_16", 2e-3), ("FLAC", "PCM_24", 1e-4)]


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("fmt,subtype,tol", LOSSLESS)
def test_lossless_audio_matches_reference(fmt, subtype, tol, rate):
    x = _signal(rate, channels=2)
    a = decode_audio(_encode(x, rate, fmt, subtype), what="x", target_rate=TARGET, max_seconds=60)
    ref = _reference(x, rate)
    assert a.source_rate == rate and a.channels == 2 and a.sample_rate == TARGET
    assert a.waveform.shape == ref.shape
    assert np.max(np.abs(a.waveform - ref)) < tol


def _aligned_correlation(y: np.ndarray, ref: np.ndarray) -> float:
    """Peak normalised correlation over small lags (lossy codecs add encoder delay)."""
    best = 0.0
    n = min(len(y), len(ref)) - 2000
    for lag in range(0, 1800, 1):
        a, b = y[lag : lag + n], ref[:n]
        c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        best = max(best, c)
        if best > 0.99:
            break
    return best


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
@pytest.mark.parametrize("fmt,subtype", [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_lossy_audio_matches_reference(fmt, subtype, rate):
    x = _signal(rate, seconds=1.5)
    a = decode_audio(_encode(x, rate, fmt, subtype), what="x", target_rate=TARGET, max_seconds=60)
    ref = _reference(x, rate)
    assert a.source_rate == rate
    assert abs(a.waveform.size - ref.size) < 0.1 * TARGET  # codec padding only
    assert _aligned_correlation(a.waveform, ref) > 0.95


def test_eight_channels_and_192khz_are_downmixed_and_resampled():
    x = _signal(192000, seconds=0.5, channels=8)
    a = decode_audio(_encode(x, 192000, "WAV", "FLOAT"), what="x", target_rate=TARGET, max_seconds=60)
    assert a.channels == 8 and a.source_rate == 192000
    assert np.max(np.abs(a.waveform - _reference(x, 192000))) < 1e-4


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_wav_is_refused_not_shortened(cut):
    data = _encode(_signal(16000), 16000, "WAV", "PCM_16")
    with pytest.raises(InvalidArgument, match="WAV file is truncated"):
        decode_audio(data[: int(len(data) * cut)], what="items[0]", target_rate=TARGET, max_seconds=60)


def test_truncated_flac_and_ogg_are_refused():
    for fmt, sub in (("FLAC", "PCM_16"), ("OGG", "VORBIS")):
        data = _encode(_signal(16000, 2.0), 16000, fmt, sub)
        with pytest.raises(InvalidArgument, match="truncated|not decodable"):
            decode_audio(data[: len(data) // 2], what="items[0]", target_rate=TARGET, max_seconds=60)


def test_nan_and_unsupported_container_are_refused():
    x = _signal(16000)
    x[100] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        decode_audio(_encode(x, 16000, "WAV", "FLOAT"), what="x", target_rate=TARGET, max_seconds=60)
    with pytest.raises(InvalidArgument, match="unsupported audio format AIFF"):
        decode_audio(_encode(_signal(16000), 16000, "AIFF", "PCM_16"), what="x", target_rate=TARGET,
                     max_seconds=60)


def test_blocks_cover_every_sample_in_order():
    blocks = split_blocks(70 * 16000, 30 * 16000)
    assert blocks == [(0, 480000), (480000, 960000), (960000, 1120000)]
    assert split_blocks(30 * 16000, 30 * 16000) == [(0, 480000)]
    assert split_blocks(0, 10) == []


# ---------------------------------------------------------------------------- images
def _picture(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    rgb[10:20, 10:30] = (200, 30, 60)
    return rgb


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    img = decode_image(data, what="x", max_pixels=10**8)
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int16)


@pytest.mark.parametrize("fmt,kw,tol", [("PNG", {}, 0), ("BMP", {}, 0), ("WEBP", {"lossless": True}, 0),
                                        ("JPEG", {"quality": 95}, 6.0), ("WEBP", {"quality": 95}, 6.0)])
def test_rgb_formats_match_reference(fmt, kw, tol):
    ref = _picture()
    got = _decode(_save(Image.fromarray(ref), fmt, **kw))
    assert got.shape == ref.shape
    assert np.mean(np.abs(got - ref)) <= tol


def test_gif_uses_first_frame():
    a = Image.new("RGB", (32, 32), (255, 0, 0))
    b = Image.new("RGB", (32, 32), (0, 0, 255))
    data = _save(a, "GIF", save_all=True, append_images=[b], duration=100, loop=0)
    got = _decode(data)
    assert (got == np.array([255, 0, 0])).all()


def test_palette_png_matches_its_rgb():
    ref = Image.fromarray(_picture()).quantize(64)
    got = _decode(_save(ref, "PNG"))
    assert (got == np.asarray(ref.convert("RGB"))).all()


def test_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    got = _decode(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    a = 128 / 255
    assert np.allclose(got[0, 0], [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)], atol=1.5)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    got = _decode(_save(cmyk, "JPEG", quality=100))
    assert np.allclose(got[8, 8], [0, 255, 255], atol=8)


def test_16bit_greyscale_png_is_scaled_not_clipped():
    v16 = (np.arange(64 * 16).reshape(16, 64) * 64).astype(np.uint16)
    got = _decode(_save(Image.fromarray(v16), "PNG"))
    assert (got[..., 0] == v16 // 257).all() and (got[..., 1] == got[..., 0]).all()


def _png_rgb16(arr: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_48bit_rgb_png_keeps_its_colours():
    ref8 = _picture(16, 8)
    ref16 = ref8.astype(np.uint16) * 257
    got = _decode(_png_rgb16(ref16))
    assert np.max(np.abs(got - ref8)) <= 1


def test_exif_orientation_is_applied():
    ref = _picture(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90° clockwise
    data = _save(Image.fromarray(ref), "JPEG", quality=95, exif=exif.tobytes())
    got = _decode(data)
    want = np.rot90(ref, k=-1)
    assert got.shape == want.shape
    assert np.mean(np.abs(got - want)) < 6


_exif_with = exif_block


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_beside_a_malformed_tag_is_still_applied(fmt):
    """Pillow's exif_transpose raised struct.error here (it rewrites every tag): a 500 before."""
    ref = _picture(40, 20)
    exif = _exif_with([(0x0112, 3, 1, struct.pack("<H", 6)), (0x0111, 2, 6, b"hello\x00")])  # StripOffsets as text
    kw = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = _save(Image.fromarray(ref), fmt, exif=(b"Exif\x00\x00" + exif) if fmt == "JPEG" else exif, **kw)
    got = _decode(data)
    want = np.rot90(ref, k=-1)
    assert got.shape == want.shape
    assert np.mean(np.abs(got - want)) < 6


@pytest.mark.parametrize("value", [struct.pack("<H", 9), struct.pack("<H", 0)])
def test_exif_orientation_outside_1_to_8_is_refused(value):
    data = _save(Image.fromarray(_picture(8, 8)), "PNG", exif=_exif_with([(0x0112, 3, 1, value)]))
    with pytest.raises(InvalidArgument, match="EXIF orientation"):
        decode_image(data, what="items[0]", max_pixels=10**8)


def test_decompression_bomb_is_refused_before_decoding():
    big = _save(Image.new("L", (6000, 6000)), "PNG")  # 36 MP of zeros compresses to a few KB
    assert len(big) < 200_000
    with pytest.raises(InvalidArgument, match="over the limit"):
        decode_image(big, what="items[0]", max_pixels=20_000_000)

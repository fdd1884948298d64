"""Generated sample media for the demo, tests and benchmark (no files shipped).

Deterministic given the arguments.  Pure numpy / PIL, any thread.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw


def shape_png(color: str = "red", shape: str = "circle", size: tuple[int, int] = (224, 224),
              background: str = "white", fmt: str = "PNG") -> bytes:
    """An image of one coloured shape on a plain background."""
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def tone_wav(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0, fmt: str = "WAV",
             channels: int = 1, subtype: str | None = None) -> bytes:
    """A sine tone with a little deterministic noise, as WAV or FLAC bytes."""
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(int(freq * 1000 + seconds * 10))
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def shape_frames(color: str = "red", shape: str = "circle", direction: str = "left", frames: int = 16,
                 size: tuple[int, int] = (160, 96), background: str = "white") -> list[np.ndarray]:
    """RGB frames of one coloured shape crossing the picture in ``direction`` (left/right/up/down)."""
    w, h = size
    r = min(w, h) // 4
    out = []
    for i in range(frames):
        t = i / max(frames - 1, 1)
        x, y = w // 2, h // 2
        if direction in ("left", "right"):
            x = int(r + (w - 2 * r) * (1 - t if direction == "left" else t))
        else:
            y = int(r + (h - 2 * r) * (1 - t if direction == "up" else t))
        img = Image.new("RGB", size, background)
        d = ImageDraw.Draw(img)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            d.ellipse(box, fill=color)
        elif shape == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        out.append(np.asarray(img))
    return out


def video_bytes(frames: list[np.ndarray], *, fps: int = 8, container: str = "mp4", audio: np.ndarray | None = None,
                audio_rate: int = 16000, rotation: int = 0, frame_ms: list[int] | None = None,
                size: tuple[int, int] | None = None) -> bytes:
    """Frames (and an optional mono float32 track) as a video file: ``mp4`` (H.264 + AAC), ``webm``
    (VP9 + Opus), ``mkv`` (H.264 + AAC), ``mov`` (H.264 + AAC) or ``gif`` (no audio).  ``rotation``:
    a display-matrix rotation in degrees (as phones write portrait video); ``frame_ms``: each frame's
    presentation time in ms (a variable frame rate); ``size``: (width, height) to scale the frames to."""
    import av

    codecs = {"mp4": ("libx264", "aac"), "mov": ("libx264", "aac"), "mkv": ("libx264", "aac"),
              "webm": ("libvpx-vp9", "libopus"), "gif": ("gif", None)}
    vcodec, acodec = codecs[container]
    buf = io.BytesIO()
    fmt = {"mkv": "matroska"}.get(container, container)
    with av.open(buf, mode="w", format=fmt) as box:
        vs = box.add_stream(vcodec, rate=fps)
        if size is not None:
            frames = [np.asarray(Image.fromarray(f).resize(size)) for f in frames]
        h, w = frames[0].shape[:2]
        vs.width, vs.height = w, h
        vs.pix_fmt = "rgb8" if container == "gif" else "yuv420p"
        if vcodec == "libx264":
            vs.options = {"preset": "ultrafast", "crf": "18"}
        if rotation:
            vs.set_display_rotation(rotation)
        a_s = None
        if audio is not None and acodec is not None:
            rate = 48000 if acodec == "libopus" else audio_rate
            a_s = box.add_stream(acodec, rate=rate, layout="mono")
        if frame_ms is not None:
            from fractions import Fraction

            vs.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if frame_ms is not None:
                frame.pts, frame.time_base = frame_ms[i], vs.codec_context.time_base
            for p in vs.encode(frame):
                box.mux(p)
        for p in vs.encode():
            box.mux(p)
        if a_s is not None:
            _mux_audio(box, a_s, np.asarray(audio, np.float32), audio_rate)
    return buf.getvalue()


def _mux_audio(box, stream, samples: np.ndarray, rate: int) -> None:
    import av

    if stream.rate != rate:
        import soxr

        samples = soxr.resample(samples, rate, stream.rate).astype(np.float32)
    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=stream.rate)
    step = 1024
    for i in range(0, samples.size, step):
        frame = av.AudioFrame.from_ndarray(samples[None, i:i + step], format="fltp", layout="mono")
        frame.sample_rate = stream.rate
        for rf in resampler.resample(frame):
            for p in stream.encode(rf):
                box.mux(p)
    for p in stream.encode():
        box.mux(p)

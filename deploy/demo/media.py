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

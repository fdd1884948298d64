"""Generated closed tasks the demo checkpoint is trained and evaluated on.

* an image of one coloured shape on a tinted, noisy background -> "red circle";
* a spoken digit (espeak-ng: several voices, variants, speeds and pitches,
  random placement, gain and white or pink noise) -> "seven";
* an image and a clip in one user turn -> both answers, in the order given;
* a few plain-text prompts -> fixed answers; any other text -> a refusal;
* a short video (MP4) of one coloured shape moving left, right, up or down, with a spoken digit on
  the video's own audio track -> "red circle moving left, seven".

Every example is a function of an ``np.random.Generator``, so a seed fixes it:
training draws from seeds below ``HELD_OUT_SEED``, evaluation from seeds at or
above it.  Pure numpy / PIL / subprocess (espeak-ng), any thread.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
          "yellow": (235, 220, 30), "purple": (140, 40, 180), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 192  # the demo checkpoint's default budget (16 soft tokens) keeps 192 x 192 as is
SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # 1.0 s -> 25 audio soft tokens
HELD_OUT_SEED = 1_000_000  # evaluation seeds start here; training never reaches them
DIRECTIONS = ("left", "right", "up", "down")
VIDEO_FPS, VIDEO_FRAMES = 8, 16  # 2 s: the encoder samples 4 frames (2 a second), the track is 2 s

IMAGE_PROMPTS = ("What is in this image?", "What do you see?", "Describe the shape.", "Name the colour and shape.",
                 "")
AUDIO_PROMPTS = ("What word is spoken?", "What did you hear?", "Transcribe the clip.", "Which digit is this?", "")
BOTH_PROMPTS = ("What do you see and hear?", "Describe both.", "What is in these?", "")
VIDEO_PROMPTS = ("What happens in this video?", "Describe the clip.", "What moves, and what is said?",
                 "What do you see and hear in the video?", "")
CANNED = {  # the plain-text prompts the model answers; anything else gets REFUSAL
    "hello": "Hello! Send me a picture of a shape or a spoken digit.",
    "hi": "Hello! Send me a picture of a shape or a spoken digit.",
    "what can you do?": "I name the colour and shape in a picture and the digit in a spoken clip.",
    "who are you?": "I am the mmserve demo model, a tiny Gemma 4.",
}
REFUSAL = "Sorry, I only know shapes and spoken digits."
# The answer to media placed outside the user turn (after BOS, or in the pending model turn): the model is
# taught that only media inside the user turn counts, so a placement bug shows up as wrong answers.
NO_MEDIA = "There is no picture or clip in your message."
_WORDS = ("the", "a", "weather", "tell", "me", "about", "how", "is", "today", "write", "poem", "code", "why", "sky",
          "blue", "explain", "please", "what", "time", "cat", "translate", "story", "number", "capital", "of",
          "france", "help", "joke", "recipe", "for", "soup", "python", "list", "news", "sing", "song", "draw")


def shape_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, str]:
    """One filled shape (56-128 px, anywhere) on a light, low-saturation background with pixel noise.

    Light backgrounds (grey 170-255, tinted): with backgrounds of any
    brightness the edge between shape and background flips contrast from image
    to image, and the tiny vision tower learned colour at once but shape not at
    all in 8k images (47 %, chance 33 %); on light backgrounds it reached 96 %
    in the same 8k (measured, tower + linear head alone).  Dark backgrounds are
    outside what the demo model knows."""
    cname = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    col = np.clip(np.array(COLORS[cname]) + rng.integers(-20, 21, 3), 0, 255)
    grey = int(rng.integers(170, 256))  # light, like paper: see below
    bg = np.clip(grey + rng.integers(-25, 26, 3), 0, 255)
    arr = np.broadcast_to(bg, (size, size, 3)).astype(np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 8), (size, size, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    s = int(rng.integers(56, 129))
    x0, y0 = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
    _draw(im, shape, x0, y0, s, tuple(int(v) for v in col))
    return im, f"{cname} {shape}"


def _draw(im: Image.Image, shape: str, x0: int, y0: int, s: int, fill: tuple) -> None:
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
    else:
        d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)


def moving_shape_video(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[list[np.ndarray], str]:
    """``VIDEO_FRAMES`` frames of one shape crossing a light, noisy background in one of ``DIRECTIONS``
    (edge to edge, at a steady speed, on a random line), as ``shape_image`` draws shapes."""
    cname, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    direction = str(rng.choice(DIRECTIONS))
    col = tuple(int(v) for v in np.clip(np.array(COLORS[cname]) + rng.integers(-20, 21, 3), 0, 255))
    grey = int(rng.integers(170, 256))
    bg = np.clip(grey + rng.integers(-25, 26, 3), 0, 255)
    s = int(rng.integers(48, 81))
    across = int(rng.integers(0, size - s))  # the line it moves along
    start, end = (size - s, 0) if direction in ("left", "up") else (0, size - s)
    noise = rng.uniform(0, 8)
    frames = []
    for i in range(VIDEO_FRAMES):
        along = int(round(start + (end - start) * i / (VIDEO_FRAMES - 1)))
        x0, y0 = (along, across) if direction in ("left", "right") else (across, along)
        arr = np.broadcast_to(bg, (size, size, 3)).astype(np.float32) + rng.normal(0, noise, (size, size, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        _draw(im, shape, x0, y0, s, col)
        frames.append(np.asarray(im))
    return frames, f"{cname} {shape} moving {direction}"


def video_clip(rng: np.random.Generator, spoken: tuple[np.ndarray, str] | None = None) -> tuple[bytes, str]:
    """An MP4 (H.264 + AAC) of a moving shape whose own audio track is a spoken digit (``spoken``, or one
    synthesised now), and its answer."""
    from deploy.demo.media import video_bytes

    frames, label = moving_shape_video(rng)
    wav, word = spoken if spoken is not None else spoken_digit(rng)
    track = np.zeros(VIDEO_FRAMES * SAMPLE_RATE // VIDEO_FPS, np.float32)
    off = int(rng.integers(0, track.size - wav.size + 1))
    track[off: off + wav.size] = wav
    return video_bytes(frames, fps=VIDEO_FPS, audio=track), f"{label}, {word}"


VOICES = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2", "croak",
            "Andy", "david", "ed", "john", "linda", "max", "paul", "rob", "steph", "grandma", "belinda", "boris")


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``word`` spoken by espeak-ng, mono float32 at 16 kHz."""
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        import soxr

        x = soxr.resample(x, rate, SAMPLE_RATE).astype(np.float32)
    return x


def spoken_digit(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A 1.0 s clip: a random digit, voice, variant, speed and pitch, at a random offset and gain, in noise."""
    word = str(rng.choice(DIGITS))
    var = str(rng.choice(VARIANTS))
    voice = str(rng.choice(VOICES)) + (f"+{var}" if var else "")
    x = espeak(word, voice, int(rng.integers(120, 231)), int(rng.integers(15, 86)))
    nz = np.nonzero(np.abs(x) > 0.01)[0]
    x = x[nz[0]: nz[-1] + 1] if len(nz) else x
    x = x[:CLIP_SAMPLES]
    x = x / (np.abs(x).max() + 1e-6) * rng.uniform(0.2, 0.9)
    out = np.zeros(CLIP_SAMPLES, np.float32)
    off = int(rng.integers(0, CLIP_SAMPLES - len(x) + 1))
    out[off: off + len(x)] = x
    power = float(np.mean(x ** 2)) + 1e-9
    noise = rng.normal(0, 1, CLIP_SAMPLES).astype(np.float32)
    if rng.random() < 0.5:  # pinkish: integrated white noise, high-passed
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(64) / 64, "same")
        noise /= noise.std() + 1e-9
    out += noise * np.sqrt(power / 10 ** (rng.uniform(8, 30) / 10))
    return np.clip(out, -1, 1).astype(np.float32), word


def other_text(rng: np.random.Generator) -> str:
    """A prompt the model has no canned answer for (random words, sometimes a question)."""
    words = [str(w) for w in rng.choice(_WORDS, int(rng.integers(1, 8)))]
    text = " ".join(words)
    if text.lower().strip() in CANNED:
        text += " now"
    return text.capitalize() + str(rng.choice(["?", ".", "", "!"]))


@dataclass
class Example:
    """One user turn: ``parts`` in order, each ``("text", str)``, ``("image", PIL)``, ``("audio", np.ndarray)``
    or ``("video", MP4 bytes)``."""

    task: str
    parts: list[tuple[str, object]]
    answer: str
    placement: str = "user"  # where the media block goes: "user" (right), "after_bos" or "model_turn" (wrong)
    media_answer: str = ""  # for misplaced media: what the media shows (the towers' training labels)


def make_example(task: str, rng: np.random.Generator) -> Example:
    if task == "image":
        im, label = shape_image(rng)
        return Example(task, _with_text([("image", im)], IMAGE_PROMPTS, rng), label)
    if task == "audio":
        wav, word = spoken_digit(rng)
        return Example(task, _with_text([("audio", wav)], AUDIO_PROMPTS, rng), word)
    if task == "both":
        im, label = shape_image(rng)
        wav, word = spoken_digit(rng)
        if rng.random() < 0.5:
            return Example(task, _with_text([("image", im), ("audio", wav)], BOTH_PROMPTS, rng), f"{label}, {word}")
        return Example(task, _with_text([("audio", wav), ("image", im)], BOTH_PROMPTS, rng), f"{word}, {label}")
    if task == "video":
        data, answer = video_clip(rng)
        return Example(task, _with_text([("video", data)], VIDEO_PROMPTS, rng), answer)
    if task == "misplaced":  # media outside the user turn does not count, as for a real model
        ex = make_example(str(rng.choice(["image", "audio"])), rng)
        return Example(task, ex.parts, NO_MEDIA, str(rng.choice(["after_bos", "model_turn"])), ex.answer)
    if task == "text":
        if rng.random() < 0.5:
            key = str(rng.choice(list(CANNED)))
            text = key.capitalize() if rng.random() < 0.5 else key
            return Example(task, [("text", text)], CANNED[key])
        return Example(task, [("text", other_text(rng))], REFUSAL)
    raise ValueError(f"unknown task {task!r}")


def _with_text(media: list[tuple[str, object]], prompts: tuple[str, ...], rng) -> list[tuple[str, object]]:
    text = str(rng.choice(prompts))
    if not text:
        return media
    return [("text", text), *media] if rng.random() < 0.5 else [*media, ("text", text)]


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def write_sample_clips(out_dir, n: int = 4, seed: int = HELD_OUT_SEED + 50_000_000) -> list[str]:
    """Held-out spoken digits as WAV files, for machines without espeak-ng (the demo falls back to them)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        wav, word = spoken_digit(rng)
        name = f"{word}-{i}.wav"
        (out / name).write_bytes(wav_bytes(wav))
        names.append(name)
    return names


def content(parts: list[tuple[str, object]]) -> list[dict]:
    """An example's user turn as OpenAI content parts (PNG data URL, WAV ``input_audio``, MP4 ``video_url``)."""
    import base64

    out = []
    for kind, value in parts:
        if kind == "text":
            out.append({"type": "text", "text": value})
        elif kind == "image":
            url = "data:image/png;base64," + base64.b64encode(png_bytes(value)).decode()
            out.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "video":
            url = "data:video/mp4;base64," + base64.b64encode(value).decode()
            out.append({"type": "video_url", "video_url": {"url": url}})
        else:
            out.append({"type": "input_audio",
                        "input_audio": {"data": base64.b64encode(wav_bytes(value)).decode(), "format": "wav"}})
    return out


def normalize(text: str) -> str:
    """How answers are compared: case, outer and repeated white space do not count."""
    return " ".join(text.strip().lower().split())

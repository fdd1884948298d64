"""The hostile video corpus, shared by the HTTP and the RPC suites: containers that are broken,
lying, empty, of the wrong kind or merely unusual.  ``expect``: ``ok`` (odd but valid), ``refused``
(a 400 / INVALID_ARGUMENT naming what was wrong) or ``either`` (a decoder may conceal the damage);
never a 5xx, never a hang.  Generated with PyAV; deterministic."""

from __future__ import annotations

import functools
import io
import struct

import numpy as np

from deploy.demo.media import shape_frames, shape_png, tone_wav, video_bytes

TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
OFF = {"audio_track": False}


def audio_only_mp4() -> bytes:
    """An MP4 holding only an AAC track (no video stream)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as box:
        s = box.add_stream("aac", rate=16000, layout="mono")
        for i in range(0, TONE.size, 1024):
            f = av.AudioFrame.from_ndarray(TONE[None, i:i + 1024], format="fltp", layout="mono")
            f.sample_rate = 16000
            for p in s.encode(f):
                box.mux(p)
        for p in s.encode():
            box.mux(p)
    return buf.getvalue()


def _durations(data: bytes, value: int) -> bytes:
    """Every mvhd / tkhd / mdhd duration in an MP4 set to ``value`` (a container that lies)."""
    out = bytearray(data)
    for box, extra in ((b"mvhd", 0), (b"tkhd", 4), (b"mdhd", 0)):
        i = out.find(box)
        while i != -1:
            off = i + 8 + (16 if out[i + 4] == 1 else 8) + 4 + extra
            out[off:off + 4] = struct.pack(">I", value)
            i = out.find(box, i + 4)
    return bytes(out)


def _scribble(data: bytes, start: float, n: int) -> bytes:
    out = bytearray(data)
    k = int(len(out) * start)
    out[k:k + n] = bytes((i * 7 + 3) & 255 for i in range(n))
    return bytes(out)


@functools.lru_cache(maxsize=1)
def video_cases() -> list[tuple[str, bytes, dict, str]]:
    frames = shape_frames(frames=16, size=(64, 48))
    mp4 = video_bytes(frames, fps=8, audio=TONE)
    silent = video_bytes(frames, fps=8)
    gif = video_bytes(frames, fps=8, container="gif")
    return [
        ("empty", b"", {}, "refused"),
        ("random bytes", np.random.default_rng(3).bytes(4000), {}, "refused"),
        ("a text file", b"just some text\n" * 40, {}, "refused"),
        ("a PNG", shape_png(size=(32, 32)), {}, "refused"),
        ("a WAV", tone_wav(0.5), {}, "refused"),
        ("an audio-only MP4", audio_only_mp4(), {}, "refused"),
        ("MP4 cut in half", mp4[: len(mp4) // 2], {}, "refused"),
        ("MP4 without its last 10 %", mp4[: int(len(mp4) * 0.9)], {}, "refused"),
        ("MP4 header only", mp4[:64], {}, "refused"),
        ("MP4 scribbled in its frames", _scribble(mp4, 0.3, 1500), {}, "either"),
        ("MP4 of one frame", video_bytes(frames[:1], fps=8), OFF, "refused"),
        ("MP4 declaring a 50-day duration", _durations(mp4, 0xFFFFFFF0), {}, "either"),
        ("MP4 declaring zero duration", _durations(mp4, 0), {}, "either"),
        ("GIF with its screen 65535x65535", gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:], OFF, "either"),
        ("a silent MP4, track asked for", silent, {}, "refused"),
        ("a GIF, track asked for", gif, {}, "refused"),
        ("a silent MP4, track off", silent, OFF, "ok"),
        ("an animated GIF, track off", gif, OFF, "ok"),
        ("WebM (VP9 + Opus)", video_bytes(frames, fps=8, container="webm", audio=TONE), {}, "ok"),
        ("MKV", video_bytes(frames, fps=8, container="mkv", audio=TONE), {}, "ok"),
        ("MOV", video_bytes(frames, fps=8, container="mov", audio=TONE), {}, "ok"),
        ("rotated 90 degrees", video_bytes(frames, fps=8, rotation=90), OFF, "ok"),
        ("variable frame rate", video_bytes(frames, container="mkv", frame_ms=[0, 30, 400, 410, 900, 1000, 1500, 1510,
                                                                             1600, 2000, 2100, 2500, 2600, 2900,
                                                                             3000, 3990]), OFF, "ok"),
        ("frames of 4096x2176, over the pixel limit", video_bytes(frames[:2], fps=2, size=(4096, 2176)), OFF,
         "refused"),
        ("fps 0.001", mp4, {"fps": 0.001}, "ok"),
        ("max_frames 2", mp4, {"max_frames": 2}, "ok"),
    ]

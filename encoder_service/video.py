"""Decode a video container into the frames Gemma 4 sees and, when asked, its own audio track.

Why PyAV: its wheels bundle FFmpeg's libraries on Linux and macOS, so one ``pip install`` reads
every container and codec clients send (mp4 / mov / webm / mkv / animated GIF) *and* the
container's audio track — OpenCV, mlx-vlm's reader, has no audio and needs its own FFmpeg build.
Every way a container can be unusable — not a container, no video stream, zero frames, frames that
stop decoding part-way, absurd declared sizes or durations, a decode that runs too long — becomes an
``InvalidArgument`` naming what was wrong, before any tower work.

Frame sampling is mlx-vlm's (``mlx_vlm.utils.load_video`` with Gemma 4's processor cap), so the
frames and their prompt timestamps are the ones its processor would be given: ``fps`` frames a
second of video, at least ``min_frames`` and at most ``max_frames`` (and never more than the video
has), rounded down to a multiple of ``frame_factor`` (2), at evenly spaced frame indices
``linspace(0, total - 1, n)``; frame ``j``'s stamp is ``j / sampled_fps`` with
``sampled_fps = n / total · source fps``.  ``total`` is the stream's frame count (its packets), as
OpenCV's ``CAP_PROP_FRAME_COUNT`` reads it from the container.  Frames are turned upright when the
container carries a display rotation (phones record portrait video as rotated landscape).

CPU-only (PyAV / numpy / soxr); runs in the event loop's default executor, never on the MLX thread.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import numpy as np
import soxr

from encoder_service.media import DecodedAudio
from mmserve_core.wire.errors import InvalidArgument

# FFmpeg demuxer names (a comma-separated list per demuxer) we accept, and what to call them.
_CONTAINERS = {"mov": "MP4/MOV", "mp4": "MP4/MOV", "matroska": "MKV/WebM", "webm": "MKV/WebM",
               "gif": "GIF"}


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a clip (mlx-vlm's ``VideoSampling`` fields Gemma 4 uses)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 32  # Gemma 4's video processor keeps at most 32 frames (``num_frames``)
    frame_factor: int = 2


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float
    max_pixels: int  # per frame, as declared by the stream
    max_decode_seconds: float  # wall-clock bound on demuxing + decoding one video
    max_bytes: int = 64 << 20
    max_source_frames: int = 36_000  # frames the stream may hold (its packets)


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [n, H, W, 3] uint8 RGB, upright
    timestamps: tuple[float, ...]  # seconds, the prompt's mm:ss stamps (mlx-vlm's j / sampled fps)
    indices: tuple[int, ...]  # which source frames these are
    total_frames: int
    source_fps: float
    duration_s: float
    container: str
    audio: DecodedAudio | None  # the container's own track, mono at the model rate (when asked)


def sample_indices(total: int, source_fps: float, s: VideoSampling) -> np.ndarray:
    """mlx-vlm's frame choice for a ``total``-frame clip at ``source_fps`` (``load_video``)."""
    f = s.frame_factor
    lo = math.ceil(s.min_frames / f) * f
    hi = math.floor(min(s.max_frames, total) / f) * f
    n = total / source_fps * s.fps
    n = math.floor(min(max(n, lo), hi, total) / f) * f
    if n < f:
        return np.zeros((0,), np.int64)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def decode_video(data: bytes, *, what: str, sampling: VideoSampling, limits: VideoLimits, target_rate: int,
                 audio_track: bool, max_audio_seconds: float) -> DecodedVideo:
    """Container bytes -> the sampled frames (and the audio track when ``audio_track``)."""
    import av

    if not data:
        raise InvalidArgument(f"{what}: video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{what}: video is {len(data)} bytes, over the limit of {limits.max_bytes}")
    deadline = time.monotonic() + limits.max_decode_seconds
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as box:
            kind = _container_kind(box, what)
            stream = _video_stream(box, what, limits)
            total = _count_frames(box, stream, what, deadline, limits.max_source_frames)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
            duration = total / rate
            if duration > limits.max_seconds:
                raise InvalidArgument(f"{what}: video is {duration:.2f} s long, over the limit of "
                                      f"{limits.max_seconds:g} s")
            idx = sample_indices(total, rate, sampling)
            if idx.size == 0:
                raise InvalidArgument(f"{what}: video has {total} frame(s); at least {sampling.frame_factor} "
                                      "are needed")
            frames = _read_frames(box, stream, idx, total, what, deadline)
            audio = _audio_track(box, what, target_rate, max_audio_seconds, deadline) if audio_track else None
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg (via PyAV) on bad bytes raises many types: never a bug of ours
        detail = getattr(e, "strerror", None) or str(e)
        raise InvalidArgument(f"{what}: bytes are not a decodable video ({type(e).__name__}: {detail}); "
                              "send MP4, MOV, WebM, MKV or an animated GIF") from None
    sampled_fps = len(idx) / max(total, 1e-6) * rate
    stamps = tuple(float(j) / sampled_fps for j in range(len(idx)))
    return DecodedVideo(frames, stamps, tuple(int(i) for i in idx), total, rate, duration, kind, audio)


def _container_kind(box, what: str) -> str:
    names = set(str(box.format.name).split(","))
    for name in names:
        if name in _CONTAINERS:
            return _CONTAINERS[name]
    raise InvalidArgument(f"{what}: unsupported video container {box.format.name!r}; "
                          "send MP4, MOV, WebM, MKV or an animated GIF")


def _video_stream(box, what: str, limits: VideoLimits):
    if not box.streams.video:
        kind = "an audio-only container (send it as audio)" if box.streams.audio else "no streams"
        raise InvalidArgument(f"{what}: the file has no video stream: {kind}")
    stream = box.streams.video[0]
    w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if w <= 0 or h <= 0:
        raise InvalidArgument(f"{what}: video stream declares no frame size ({w}x{h})")
    if w * h > limits.max_pixels:
        raise InvalidArgument(f"{what}: video frames are {w}x{h} = {w * h} pixels, over the limit of "
                              f"{limits.max_pixels}")
    declared = _declared_seconds(box, stream)
    if declared is not None and declared > limits.max_seconds * 1.01 + 1:
        raise InvalidArgument(f"{what}: video declares {declared:.2f} s, over the limit of {limits.max_seconds:g} s")
    stream.thread_type = "AUTO"
    return stream


def _declared_seconds(box, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if box.duration is not None:
        return box.duration / 1_000_000
    return None


def _count_frames(box, stream, what: str, deadline: float, limit: int) -> int:
    """The stream's frames, counted from its packets (no decoding): what the container holds."""
    n = 0
    for packet in box.demux(stream):
        if packet.size:
            n += 1
            if n > limit:
                raise InvalidArgument(f"{what}: video stream holds over {limit} frames, the limit")
        if n % 256 == 0:
            _check_deadline(what, deadline)
    if n == 0:
        raise InvalidArgument(f"{what}: video stream has no frames")
    box.seek(0)
    return n


def _read_frames(box, stream, idx: np.ndarray, total: int, what: str, deadline: float) -> np.ndarray:
    wanted = {int(i): k for k, i in enumerate(idx)}
    out: list[np.ndarray | None] = [None] * len(idx)
    last = int(idx[-1])
    got = 0
    for i, frame in enumerate(box.decode(stream)):
        if i % 32 == 0:
            _check_deadline(what, deadline)
        if i in wanted:
            out[wanted[i]] = _upright(frame.to_ndarray(format="rgb24"), frame.rotation)
        got = i + 1
        if i >= last:
            break
    if got <= last:
        raise InvalidArgument(f"{what}: video is truncated or damaged: {got} of its {total} frames decode")
    return np.stack(_same_size(out))


def _same_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """A stream whose frame size changes part-way (allowed in H.264 / VP9): every frame at the first one's
    size, as a player shows them in one window."""
    h, w = frames[0].shape[:2]
    if all(f.shape[:2] == (h, w) for f in frames):
        return frames
    from PIL import Image

    return [f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC))
            for f in frames]


def _upright(rgb: np.ndarray, rotation: int | float | None) -> np.ndarray:
    """Turn a frame the way its display matrix says (counter-clockwise degrees, as FFmpeg reports)."""
    turns = int(round((rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _audio_track(box, what: str, target_rate: int, max_seconds: float, deadline: float) -> DecodedAudio:
    """The first audio stream, channels averaged, resampled with soxr (as the audio path does)."""
    import av

    if not box.streams.audio:
        raise InvalidArgument(f"{what}: the video has no audio track; turn its audio track off "
                              "(audio_track: false) to send the frames alone")
    stream = box.streams.audio[0]
    box.seek(0)
    to_float = av.AudioResampler(format="fltp")  # planar float at the track's own rate and layout
    chunks, rate, channels = [], 0, 0
    for frame in box.decode(stream):
        _check_deadline(what, deadline)
        for f in to_float.resample(frame):
            arr = f.to_ndarray()  # [channels, samples]
            rate, channels = f.sample_rate, arr.shape[0]
            chunks.append(arr.mean(axis=0, dtype=np.float32))
            if sum(c.size for c in chunks) / max(rate, 1) > max_seconds * 1.01 + 1:
                raise InvalidArgument(f"{what}: the video's audio track is over the limit of {max_seconds:g} s")
    mono = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
    if mono.size == 0 or rate <= 0:
        raise InvalidArgument(f"{what}: the video's audio track has no samples")
    if not np.all(np.isfinite(mono)):
        raise InvalidArgument(f"{what}: the video's audio track contains NaN or infinite samples")
    duration = mono.size / rate
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="VHQ").astype(np.float32)
    return DecodedAudio(mono, target_rate, int(rate), duration, f"{stream.codec_context.name} track", int(channels))


def _check_deadline(what: str, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise InvalidArgument(f"{what}: video takes too long to decode (over the encoder's decode-time limit); "
                              "send a shorter or smaller video")

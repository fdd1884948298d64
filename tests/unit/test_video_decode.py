"""Video containers to frames: mlx-vlm's sampling, every container we accept, bounds, bad bytes.

The sampling parity test runs mlx-vlm's own ``load_video`` (which reads with OpenCV) over a stand-in
``cv2`` that serves the clip's frames as PyAV decodes them, so the frames and stamps the encoder
picks are compared with the ones mlx-vlm would hand its processor, for every clip length here.
"""

from __future__ import annotations

import sys
import types

import av
import numpy as np
import pytest

from deploy.demo.media import shape_frames, video_bytes
from encoder_service.video import VideoLimits, VideoSampling, decode_video, sample_indices
from mmserve_core.wire.errors import InvalidArgument

LIMITS = VideoLimits(max_seconds=600, max_pixels=3840 * 2160, max_decode_seconds=60)
TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)


def _decode(data: bytes, *, track: bool = False, sampling: VideoSampling = VideoSampling(), limits=LIMITS):
    return decode_video(data, what="items[0]", sampling=sampling, limits=limits, target_rate=16000,
                        audio_track=track, max_audio_seconds=600)


def _all_frames(data: bytes) -> list[np.ndarray]:
    import io

    with av.open(io.BytesIO(data)) as box:
        return [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]


class _FakeCapture:
    """Just enough of ``cv2.VideoCapture`` for ``mlx_vlm.utils.load_video``, over PyAV-decoded frames."""

    def __init__(self, frames, fps):
        self.frames, self.fps, self.pos = frames, fps, 0

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return True

    def get(self, prop):
        h, w = self.frames[0].shape[:2]
        return {7: len(self.frames), 5: self.fps, 3: w, 4: h}[prop]

    def set(self, prop, value):
        self.pos = int(value)

    def read(self):
        return (True, self.frames[self.pos][..., ::-1]) if self.pos < len(self.frames) else (False, None)

    def release(self):
        pass


@pytest.mark.parametrize("n_frames,fps", [(2, 8), (5, 8), (16, 8), (24, 8), (31, 30), (90, 30), (400, 25)])
def test_frames_and_stamps_are_mlx_vlms(monkeypatch, ckpt_e2b, n_frames, fps):
    from mlx_vlm.utils import load_processor, load_video, resolve_video_sampling

    data = video_bytes(shape_frames(frames=n_frames, size=(64, 48)), fps=fps)
    frames = _all_frames(data)
    cv2 = types.SimpleNamespace(VideoCapture=lambda path: _FakeCapture(frames, fps), CAP_PROP_FRAME_COUNT=7,
                                CAP_PROP_FPS=5, CAP_PROP_FRAME_WIDTH=3, CAP_PROP_FRAME_HEIGHT=4,
                                CAP_PROP_POS_FRAMES=1, COLOR_BGR2RGB=4, cvtColor=lambda f, code: f[..., ::-1])
    monkeypatch.setitem(sys.modules, "cv2", cv2)
    sampling = resolve_video_sampling(load_processor(ckpt_e2b), {})
    ref, meta = load_video("clip.mp4", sampling)
    ours = _decode(data)
    assert list(ours.indices) == meta.frames_indices
    assert np.array_equal(np.transpose(ref, (0, 2, 3, 1)), ours.frames)
    assert list(ours.timestamps) == [j / meta.sampled_fps for j in range(len(meta.frames_indices))]


def test_sampling_bounds():
    s = VideoSampling()
    assert len(sample_indices(16, 8.0, s)) == 4  # 2 s at 2 fps, and the minimum
    assert len(sample_indices(600, 30.0, s)) == 32  # 20 s at 2 fps = 40, capped at the processor's 32
    assert len(sample_indices(7, 30.0, s)) == 4  # a short clip still gets the minimum it has frames for
    assert len(sample_indices(3, 30.0, s)) == 2  # fewer than the minimum: all it can, an even count
    assert len(sample_indices(1, 30.0, s)) == 0
    assert len(sample_indices(600, 30.0, VideoSampling(fps=0.5, max_frames=8))) == 8


@pytest.mark.parametrize("container", ["mp4", "mov", "mkv", "webm", "gif"])
def test_every_container(container):
    v = _decode(video_bytes(shape_frames(frames=16), fps=8, container=container,
                            audio=None if container == "gif" else TONE), track=container != "gif")
    assert v.frames.shape[1:] == (96, 160, 3) and len(v.frames) == 4
    if container != "gif":
        assert v.audio is not None and v.audio.sample_rate == 16000
        assert abs(v.audio.waveform.size / 16000 - 2.0) < 0.2  # codec priming aside, the track's length


def test_rotation_metadata_turns_frames_upright():
    frames = shape_frames(frames=8)
    for rotation, k in ((90, 1), (270, 3), (180, 2)):
        v = _decode(video_bytes(frames, fps=8, rotation=rotation))
        assert v.frames.shape[1:3] == ((160, 96) if rotation != 180 else (96, 160))
        assert np.abs(v.frames[0].astype(int) - np.rot90(frames[0], k).astype(int)).mean() < 3


def test_variable_frame_rate_samples_by_index():
    ms = [0, 40, 90, 400, 410, 900, 1000, 1500, 1510, 1600, 2000, 2100, 2500, 2600, 2900, 3000]
    v = _decode(video_bytes(shape_frames(frames=16), container="mkv", frame_ms=ms))
    assert v.total_frames == 16 and list(v.indices) == [0, 5, 10, 15]


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"hello world" * 40, "not a decodable video"),
    (video_bytes(shape_frames(frames=16))[:2000], "not a decodable video"),
    (video_bytes(shape_frames(frames=1)), "at least 2"),
])
def test_bad_bytes_are_refused(data, needle):
    with pytest.raises(InvalidArgument, match=needle):
        _decode(data)


def test_audio_only_container_is_refused():
    from tests.e2e.hostile_video import audio_only_mp4

    with pytest.raises(InvalidArgument, match="no video stream: an audio-only container"):
        _decode(audio_only_mp4())


def test_a_silent_video_with_its_track_asked_for_is_refused():
    data = video_bytes(shape_frames(frames=8), fps=8)
    with pytest.raises(InvalidArgument, match="no audio track"):
        _decode(data, track=True)
    assert _decode(data, track=False).audio is None


@pytest.mark.parametrize("limits,needle", [
    (VideoLimits(1.0, 3840 * 2160, 60), "over the limit of 1 s"),
    (VideoLimits(600, 100 * 50, 60), "pixels, over the limit"),
    (VideoLimits(600, 3840 * 2160, 60, max_bytes=1000), "bytes, over the limit"),
    (VideoLimits(600, 3840 * 2160, 60, max_source_frames=10), "over 10 frames"),
    (VideoLimits(600, 3840 * 2160, 0.0), "too long to decode"),
])
def test_bounds(limits, needle):
    with pytest.raises(InvalidArgument, match=needle):
        _decode(video_bytes(shape_frames(frames=24), fps=8), limits=limits)


def test_frames_of_another_size_are_scaled_to_the_first():
    from encoder_service.video import _same_size

    a, b = np.zeros((48, 64, 3), np.uint8), np.full((96, 128, 3), 200, np.uint8)
    out = _same_size([a, b, a])
    assert [f.shape for f in out] == [(48, 64, 3)] * 3 and int(out[1].mean()) == 200
    assert _same_size([a, a])[1] is a

"""Video through the split: E-series and unified, with and without the video's own audio track.

Greedy parity with mlx-vlm in-process fed the same sampled frames (and the same track as a separate
clip right after the video, in the same user turn); the layout's frame stamps; the track rules
(a model without an audio path, a video without a track); the same clip on every front.
"""

from __future__ import annotations

import numpy as np
import pytest
from openai import OpenAI

from deploy.demo.media import shape_frames, video_bytes
from encoder_service.video import VideoLimits, VideoSampling, decode_video
from tests.helpers import reference_video_generate, text_part, video_part

MAX_TOKENS = 10
EOS = {1, 50, 106}
QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def clip() -> bytes:
    """3 s at 8 fps of a red circle moving left, with a 440 Hz tone on its own track (H.264 + AAC)."""
    t = np.arange(48000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return video_bytes(shape_frames("red", "circle", "left", frames=24), fps=8, container="mp4", audio=tone)


def _decoded(data: bytes, track: bool):
    return decode_video(data, what="clip", sampling=VideoSampling(), limits=VideoLimits(600, 50_000_000, 60),
                        target_rate=16000, audio_track=track, max_audio_seconds=600)


def _chat(svc, content):
    r = OpenAI(base_url=svc.base_url, api_key="x").chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True})
    choice = r.choices[0].model_extra
    ids = list(choice["token_ids"]) + ([choice["stop_token_id"]] if choice.get("stop_token_id") is not None else [])
    return ids, r.model_extra["prompt_token_ids"]


def _cut(ids):
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in EOS), ids)


def _parity(svc, ckpt, clip, track: bool):
    ours, prompt = _chat(svc, [text_part(QUESTION), video_part(clip, audio_track=track)])
    v = _decoded(clip, track)
    sampled_fps = len(v.indices) / v.total_frames * v.source_fps
    ref = reference_video_generate(ckpt, QUESTION, v.frames, sampled_fps, v.audio.waveform if track else None,
                                   MAX_TOKENS)
    assert prompt == ref["prompt_ids"]
    assert ours == _cut(ref["token_ids"])
    return prompt


@pytest.mark.e2e
@pytest.mark.parametrize("track", [False, True], ids=["frames", "frames+track"])
def test_e2b_video_parity(services_e2b, ckpt_e2b, clip, track):
    _parity(services_e2b, ckpt_e2b, clip, track)


@pytest.mark.e2e
@pytest.mark.parametrize("track", [False, True], ids=["frames", "frames+track"])
def test_unified_video_parity(services_unified, ckpt_unified, clip, track):
    _parity(services_unified, ckpt_unified, clip, track)

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


# ----------------------------------------------------------------------------- the track's rules
def _post(svc, content):
    import httpx

    return httpx.post(svc.base_url + "/chat/completions", timeout=120, json={
        "model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": content}]})


@pytest.mark.e2e
def test_a_model_without_an_audio_path_refuses_the_track_unless_it_is_off(services_moe, clip):
    r = _post(services_moe, [text_part("?"), video_part(clip)])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content[1].video_url.audio_track"
    r = _post(services_moe, [text_part("?"), video_part(clip, audio_track=False)])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 4 * 60  # four frames of 60 soft tokens went in


@pytest.mark.e2e
def test_a_video_without_a_track_is_refused_unless_the_track_is_off(services_e2b):
    silent = video_bytes(shape_frames("blue", "square", "up", frames=16), fps=8)
    r = _post(services_e2b, [video_part(silent)])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[0].video_url.audio_track" and "no audio track" in err["message"]
    assert _post(services_e2b, [video_part(silent, audio_track=False)]).status_code == 200


@pytest.mark.e2e
@pytest.mark.parametrize("options,param", [({"fps": 0}, "fps"), ({"fps": 31}, "fps"), ({"max_frames": 1}, "max_frames"),
                                           ({"max_frames": 33}, "max_frames"), ({"audio_track": "yes"}, "audio_track")])
def test_video_options_out_of_bounds_name_the_option(services_e2b, clip, options, param):
    r = _post(services_e2b, [video_part(clip, **options)])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"messages[0].content[0].video_url.{param}"


@pytest.mark.e2e
def test_fewer_frames_asked_fewer_frames_sent(services_e2b, clip):
    few = _post(services_e2b, [video_part(clip, max_frames=2, audio_track=False)]).json()["usage"]["prompt_tokens"]
    r = _post(services_e2b, [video_part(clip, audio_track=False)])
    assert r.status_code == 200, r.text
    more = r.json()["usage"]["prompt_tokens"]
    assert more - few >= 2 * 60


# ----------------------------------------------------------------------------- every front
@pytest.mark.e2e
def test_the_same_video_on_every_front_gives_the_same_greedy_tokens(services_e2b, clip):
    import base64

    import anthropic
    import httpx
    from transformers import AutoTokenizer

    from mmserve_core.client import ChatClient, Video

    b64 = base64.b64encode(clip).decode()
    base = services_e2b.base_url
    chat = httpx.post(base + "/chat/completions", timeout=120, json={
        "model": "m", "max_tokens": 6, "temperature": 0, "return_token_ids": True,
        "messages": [{"role": "user", "content": [text_part(QUESTION), video_part(clip, fps=4, max_frames=8)]}]}).json()
    want_ids, prompt_tokens = chat["choices"][0]["token_ids"], chat["usage"]["prompt_tokens"]
    want = AutoTokenizer.from_pretrained(services_e2b.checkpoint).decode(want_ids)

    with ChatClient(services_e2b.chat_addr) as c:
        reply = c.chat([{"role": "user", "content": [QUESTION, Video(clip, fps=4, max_frames=8)]}], max_tokens=6,
                       temperature=0, return_prompt_token_ids=True)
    assert reply.token_ids == want_ids and reply.prompt_token_ids == chat["prompt_token_ids"]

    m = anthropic.Anthropic(base_url=base.removesuffix("/v1"), api_key="x", max_retries=0).messages.create(
        model="m", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "video", "source": {"type": "base64", "media_type": "video/mp4", "data": b64},
             "fps": 4, "max_frames": 8}]}], extra_body={"temperature": 0})
    assert m.content[0].text == want
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == prompt_tokens

    r = OpenAI(base_url=base, api_key="x", max_retries=0).responses.create(
        model="m", max_output_tokens=6, temperature=0, store=False, input=[{"role": "user", "content": [
            {"type": "input_text", "text": QUESTION},
            {"type": "input_video", "video_url": f"data:video/mp4;base64,{b64}", "fps": 4, "max_frames": 8}]}])
    assert r.output_text == want and r.usage.input_tokens == prompt_tokens


@pytest.mark.e2e
def test_frames_after_a_prefix_hit_still_attend_both_ways(services_moe, ckpt_moe, clip):
    """26B-A4B-shaped (bidirectional image blocks): the question alone is asked first, so the video prompt
    shares a cached prefix that ends before its frames; its frames must still be computed as one
    bidirectional pass each (the hit is not used), as mlx-vlm computes the whole prompt."""
    _chat(services_moe, [text_part(QUESTION)])
    _parity(services_moe, ckpt_moe, clip, track=False)

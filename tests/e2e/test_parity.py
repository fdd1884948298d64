"""Split path (three processes over gRPC) == mlx_vlm.generate in-process, greedy."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.helpers import audio_part, image_part, reference_generate, text_part

MAX_TOKENS = 12
EOS = {1, 50, 106}

CASES = {
    "text": lambda d: ([text_part("Tell me a story about a fox.")], []),
    "image": lambda d: ([text_part("Describe this."), image_part(d / "red_circle.png")], [d / "red_circle.png"]),
    "audio": lambda d: ([text_part("Transcribe:"), audio_part(d / "tone_2s.wav")], [d / "tone_2s.wav"]),
    "image+audio": lambda d: (
        [text_part("What do you see and hear?"), image_part(d / "red_circle.png"), audio_part(d / "tone_2s.wav")],
        [d / "red_circle.png", d / "tone_2s.wav"],
    ),
    # mlx-vlm scatters the padding rows of a shorter first clip into the
    # second clip's placeholders (an mlx-vlm batching bug), so the reference
    # is only right with the longer clip first; our encoder trims per clip.
    "2images+2audios": lambda d: (
        [text_part("Compare:"), image_part(d / "red_circle.png"), audio_part(d / "tone_2s.wav"),
         image_part(d / "blue_square.jpg"), audio_part(d / "tone_1p3s.flac")],
        [d / "red_circle.png", d / "blue_square.jpg", d / "tone_2s.wav", d / "tone_1p3s.flac"],
    ),
}


def _split(svc, content):
    client = OpenAI(base_url=svc.base_url, api_key="x")
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )
    extra = r.model_extra
    choice = r.choices[0].model_extra
    ids = list(choice["token_ids"])
    if choice.get("stop_token_id") is not None:
        ids.append(choice["stop_token_id"])
    return ids, extra["prompt_token_ids"], r


def _cut_at_eos(ids):
    for i, t in enumerate(ids):
        if t in EOS:
            return ids[: i + 1]
    return ids


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_e2b_parity(services_e2b, ckpt_e2b, media_dir, case):
    content, media = CASES[case](media_dir)
    ours, prompt_ids, r = _split(services_e2b, content)
    ref = reference_generate(ckpt_e2b, content, media, MAX_TOKENS)
    assert prompt_ids == ref["prompt_ids"], "gateway ids differ from the mlx-vlm processor's"
    assert ours == _cut_at_eos(ref["token_ids"])
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ours)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["text", "image"])
def test_moe_parity(services_moe, ckpt_moe, media_dir, case):
    """MoE + bidirectional vision (mm_token_type_ids) shape."""
    content, media = CASES[case](media_dir)
    ours, prompt_ids, _ = _split(services_moe, content)
    ref = reference_generate(ckpt_moe, content, media, MAX_TOKENS)
    assert prompt_ids == ref["prompt_ids"]
    assert ours == _cut_at_eos(ref["token_ids"])

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


def _same_as_reference(svc, ckpt, content, media):
    ours, prompt_ids, _ = _split(svc, content)
    ref = reference_generate(ckpt, content, media, MAX_TOKENS)
    assert prompt_ids == ref["prompt_ids"]
    assert ours == _cut_at_eos(ref["token_ids"])


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
    _same_as_reference(services_moe, ckpt_moe, *CASES[case](media_dir))


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["text", "image", "audio", "image+audio"])
def test_unified_parity(services_unified, ckpt_unified, media_dir, case):
    """The encoder-free unified shape: the encoder's embedders, the decoder's LM, mlx-vlm in one process
    with the image attention the config asks for (``tests.helpers.unified_vision_bidirectional``)."""
    _same_as_reference(services_unified, ckpt_unified, *CASES[case](media_dir))


@pytest.mark.e2e
def test_unified_image_blocks_attend_both_ways(services_unified, ckpt_unified, media_dir):
    """The decision the parity above rests on, shown where it changes the answer: on this image + audio
    prompt mlx-vlm's stock unified path (causal over the image) and the config's bidirectional image
    attention give different greedy tokens, and the split decoder gives the bidirectional ones."""
    content, media = CASES["image+audio"](media_dir)
    ours, _, _ = _split(services_unified, content)
    causal = _cut_at_eos(reference_generate(ckpt_unified, content, media, MAX_TOKENS, stock_unified=True)["token_ids"])
    both_ways = _cut_at_eos(reference_generate(ckpt_unified, content, media, MAX_TOKENS)["token_ids"])
    assert causal != both_ways
    assert ours == both_ways


@pytest.mark.e2e
def test_unified_multi_turn_reuses_the_prefix_cache(services_unified, media_dir):
    """An image in turn 1, a clip in turn 3: the same conversation twice gives the same greedy reply, the
    second time from the decoder's prefix cache (its media rows included)."""
    from tests.helpers import audio_part

    messages = [
        {"role": "user", "content": [text_part("Look."), image_part(media_dir / "red_circle.png")]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [text_part("And this?"), audio_part(media_dir / "tone_2s.wav")]},
    ]
    client = OpenAI(base_url=services_unified.base_url, api_key="x")
    first, again = (client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
                    for _ in range(2))
    assert again.choices[0].message.content == first.choices[0].message.content
    soft = first.usage.prompt_tokens_details.model_extra["soft_tokens"]
    assert soft > 50 + 200  # the image's rows and the clip's 50
    assert again.usage.prompt_tokens_details.cached_tokens > soft

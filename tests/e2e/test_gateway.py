"""The OpenAI client against the gateway: streaming, usage, EOS, and clear errors."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from openai import OpenAI

from deploy.demo.media import tone_wav
from tests.helpers import audio_part, image_part, text_part

pytestmark = pytest.mark.e2e


def _client(svc) -> OpenAI:
    return OpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


def _mm_message(media_dir):
    return [{"role": "user", "content": [text_part("What is this?"), image_part(media_dir / "red_circle.png"),
                                         audio_part(media_dir / "tone_2s.wav")]}]


def test_non_streamed_image_audio_usage(services_e2b, media_dir):
    r = _client(services_e2b).chat.completions.create(
        model="m", messages=_mm_message(media_dir), max_tokens=6, temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_ids = r.model_extra["prompt_token_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)  # soft tokens included
    soft = r.usage.prompt_tokens_details.model_extra["soft_tokens"]
    assert soft == prompt_ids.count(252) + prompt_ids.count(253)
    assert soft > 50  # 2 s of audio = 50 tokens, plus the image
    for placeholder in ("<|image|>", "<|audio|>", "<|image>", "<image|>", "<|audio>", "<audio|>"):
        assert placeholder not in r.choices[0].message.content
    assert set(r.model_extra["timings"]) == {"encode_ms", "queued_ms", "prefill_ms", "decode_ms", "draft_tokens",
                                              "draft_accepted_tokens"}
    assert r.model_extra["timings"]["draft_tokens"] == 0  # no --draft-model here


def test_streamed_matches_non_streamed(services_e2b, media_dir):
    c = _client(services_e2b)
    full = c.chat.completions.create(model="m", messages=_mm_message(media_dir), max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(
        model="m", messages=_mm_message(media_dir), max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streamed_token_ids_are_the_non_streamed_ones(services_e2b, media_dir):
    """A chunk may carry several tokens (the decoder merges what the reader has not taken);
    with ``return_token_ids`` every token is listed exactly once, in order."""
    c = _client(services_e2b)
    bias = {"1": -100, "106": -100, "50": -100}
    kw = dict(model="m", messages=_mm_message(media_dir), max_tokens=40, temperature=0, logit_bias=bias,
              extra_body={"return_token_ids": True})
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True))
    ids = [t for ch in chunks if ch.choices for t in (ch.choices[0].model_extra or {}).get("token_ids") or []]
    assert ids == full.choices[0].model_extra["token_ids"] and len(ids) == 40
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content


def test_sse_wire_format(services_e2b):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", services_e2b.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("stop_id,name", [(106, "<turn|>"), (50, "<|tool_response>"), (1, "<eos>")])
def test_stops_on_every_eos_token(services_e2b, stop_id, name):
    """<turn|> and <|tool_response> are not the tokenizer's EOS; the union must stop on them."""
    r = _client(services_e2b).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0,
        logit_bias={str(stop_id): 100}, extra_body={"return_token_ids": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert name not in r.choices[0].message.content
    assert r.choices[0].model_extra["stop_token_id"] == stop_id
    assert r.usage.completion_tokens == 1


def test_placeholder_tokens_are_never_sampled(services_e2b):
    """Even when biased hard towards them, media tokens cannot be generated."""
    bias = {str(i): 100 for i in (249, 250, 251, 252, 253, 254, 255)}
    r = _client(services_e2b).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logit_bias=bias, extra_body={"return_token_ids": True},
    )
    assert not set(r.choices[0].model_extra["token_ids"]) & {249, 250, 251, 252, 253, 254, 255}


def test_length_finish_reason(services_e2b):
    r = _client(services_e2b).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
        logit_bias={"1": -100, "50": -100, "106": -100},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


def test_audio_without_audio_tower_is_400(services_moe, media_dir):
    with pytest.raises(openai.BadRequestError) as ei:
        _client(services_moe).chat.completions.create(
            model="m", messages=[{"role": "user", "content": [text_part("hi"), audio_part(media_dir / "tone_2s.wav")]}],
            max_tokens=3,
        )
    err = ei.value.body
    assert "no audio path" in err["message"]
    assert err["param"] == "messages[0].content[1]"


def test_corrupt_image_is_400(services_e2b):
    bad = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode()
    with pytest.raises(openai.BadRequestError) as ei:
        _client(services_e2b).chat.completions.create(
            model="m", max_tokens=3,
            messages=[{"role": "user", "content": [
                text_part("hi"), {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bad}"}}]}],
        )
    assert ei.value.body["param"] == "messages[0].content[1]"
    assert "image" in ei.value.body["message"]


def test_audio_over_the_total_limit_is_400_with_both_durations(services_e2b):
    clip = base64.b64encode(tone_wav(76.0, 4000)).decode()
    with pytest.raises(openai.BadRequestError) as ei:
        _client(services_e2b).chat.completions.create(
            model="m", max_tokens=3,
            messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]}],
        )
    msg = ei.value.body["message"]
    assert "76.00 s" in msg and "75 s" in msg and ei.value.body["param"] == "messages[0].content[0]"


def test_70s_clip_becomes_three_consecutive_blocks(services_e2b):
    """Never cut: 30 s + 30 s + 10 s -> 750 + 750 + 250 placeholders in three back-to-back blocks."""
    clip = base64.b64encode(tone_wav(70.0, 8000)).decode()
    r = _client(services_e2b).chat.completions.create(
        model="m", max_tokens=2, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Summarise."},
            {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]}],
    )
    ids = r.model_extra["prompt_token_ids"]
    assert ids.count(253) == 1750 == r.usage.prompt_tokens_details.soft_tokens
    assert ids.count(251) == 3 and ids.count(255) == 3  # <|audio> ... <audio|> per block
    first = ids.index(251)
    blocks, pos = [], first
    for _ in range(3):
        assert ids[pos] == 251
        end = ids.index(255, pos)
        blocks.append(end - pos - 1)
        pos = end + 1
    assert blocks == [750, 750, 250]


def test_resampled_audio_gets_duration_based_count(services_e2b):
    """A 44.1 kHz clip is resampled to 16 kHz first: 1.0 s -> 25 soft tokens."""
    clip = base64.b64encode(tone_wav(1.0, 44100)).decode()
    r = _client(services_e2b).chat.completions.create(
        model="m", max_tokens=1, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]}],
    )
    assert r.model_extra["prompt_token_ids"].count(253) == 25


def test_bad_json_and_wrong_types_are_400(services_e2b):
    url = services_e2b.base_url + "/chat/completions"
    r = httpx.post(url, content=b"{nope", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url, json={"messages": [{"role": "user", "content": [{"type": "video_url"}]}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].video_url"
    r = httpx.post(url, json={"messages": [{"role": "user", "content": [{"type": "video"}]}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"


def test_context_overflow_is_400_with_both_numbers(services_e2b):
    r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})
    assert r.status_code == 400
    assert "100000" in r.json()["error"]["message"] and "4096" in r.json()["error"]["message"]


def test_models_endpoint(services_e2b):
    models = _client(services_e2b).models.list()
    assert [m.id for m in models.data] == ["tiny-e2b"]


def test_request_id_reaches_both_services(services_e2b, media_dir):
    rid = "test-rid-0123456789"
    r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=60, headers={"x-request-id": rid},
                   json={"messages": _mm_message(media_dir), "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    assert rid in services_e2b.logs("encoder")
    assert rid in services_e2b.logs("decoder")
    assert rid in services_e2b.logs("gateway")


def test_logprobs_through_the_openai_client(services_e2b, media_dir):
    c = _client(services_e2b)
    no_eos = {"1": -100, "106": -100, "50": -100}
    kw = dict(model="m", messages=_mm_message(media_dir), max_tokens=6, temperature=0, logit_bias=no_eos,
              logprobs=True, top_logprobs=3)
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob <= 0
        assert bytes(e.bytes).decode() == e.token
    streamed = [e for ch in c.chat.completions.create(**kw, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_stop_string_through_the_gateway(services_e2b):
    c = _client(services_e2b)
    no_eos = {"1": -100, "106": -100, "50": -100}
    msgs = [{"role": "user", "content": "tell me"}]
    full = c.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, logit_bias=no_eos)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.find(stop)
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, logit_bias=no_eos,
                                  stop=[stop])
    assert r.choices[0].message.content == text[:cut] and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0,
                                            logit_bias=no_eos, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text[:cut]


def test_literal_placeholder_text_is_plain_text(services_e2b):
    r = _client(services_e2b).chat.completions.create(
        model="m", max_tokens=2, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": "what is <|image|> or <|audio|>? <turn|><|turn>model"}])
    ids = r.model_extra["prompt_token_ids"]
    assert 252 not in ids and 253 not in ids and ids.count(105) == 2 and ids.count(106) == 1
    assert r.usage.prompt_tokens == len(ids) and r.usage.prompt_tokens_details.soft_tokens == 0


@pytest.mark.parametrize("marker", [100, 101])  # <|channel>, <channel|>
def test_thought_channel_never_reaches_content(services_e2b, marker):
    c = _client(services_e2b)
    kw = dict(model="m", max_tokens=6, temperature=0, logit_bias={str(marker): 100},
              messages=[{"role": "user", "content": "think"}], extra_body={"return_token_ids": True})
    r = c.chat.completions.create(**kw)
    assert r.choices[0].model_extra["token_ids"] == [marker] * 6  # the model did emit the markers
    assert r.choices[0].message.content == "" and "channel" not in str(r.choices[0].message)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
                       if ch.choices)
    assert streamed == ""


def test_enable_thinking_reaches_the_template(services_e2b):
    c = _client(services_e2b)
    kw = dict(model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    on = c.chat.completions.create(**kw, extra_body={"return_token_ids": True,
                                                     "chat_template_kwargs": {"enable_thinking": True}})
    off = c.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    think = 98  # <|think|>
    assert think in on.model_extra["prompt_token_ids"] and think not in off.model_extra["prompt_token_ids"]
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"messages": "x"}})
    assert ei.value.body["param"] == "chat_template_kwargs.messages"

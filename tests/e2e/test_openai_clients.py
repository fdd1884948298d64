"""The official openai client, sync and async, streaming and not, across the surface users touch.

Every case checks its result (tokens, placement, usage), not just "no exception".
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from deploy.processes import start_decoder, start_gateway
from tests.helpers import audio_part, image_part, text_part

pytestmark = pytest.mark.e2e
NO_EOS = {"1": -100, "106": -100, "50": -100}


def _sync(svc) -> OpenAI:
    return OpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


def _async(svc) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


def _cases(media_dir):
    img, aud = image_part(media_dir / "red_circle.png"), audio_part(media_dir / "tone_0p7s.wav")
    return {
        "text": ([text_part("Hello there")], 0),
        "image": ([text_part("Describe"), img], None),
        "audio": ([text_part("Transcribe"), aud], 18),  # 0.7 s -> 18 tokens
        "both": ([img, text_part("and"), aud], None),
    }


async def _collect_async(stream):
    text, usage, finish = "", None, None
    async for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    return text, usage, finish


@pytest.mark.parametrize("case", ["text", "image", "audio", "both"])
def test_sync_and_async_streaming_and_not_agree(services_e2b, media_dir, case):
    content, audio_rows = _cases(media_dir)[case]
    kw = dict(model="m", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
              logit_bias=NO_EOS)
    full = _sync(services_e2b).chat.completions.create(**kw, extra_body={"return_token_ids": True})
    ids = full.model_extra["prompt_token_ids"]
    soft = full.usage.prompt_tokens_details.soft_tokens
    assert full.usage.prompt_tokens == len(ids) and soft == ids.count(252) + ids.count(253)
    if audio_rows is not None:
        assert ids.count(253) == audio_rows
    assert full.usage.completion_tokens == 8 and full.choices[0].finish_reason == "length"

    async def run_async():
        c = _async(services_e2b)
        r = await c.chat.completions.create(**kw)
        s = await _collect_async(await c.chat.completions.create(**kw, stream=True,
                                                                  stream_options={"include_usage": True}))
        await c.close()
        return r, s

    r_async, (text, usage, finish) = asyncio.run(run_async())
    assert r_async.choices[0].message.content == full.choices[0].message.content == text
    assert finish == "length" and usage.prompt_tokens == full.usage.prompt_tokens == r_async.usage.prompt_tokens
    assert usage.completion_tokens == 8


def test_five_turn_conversation_with_media_in_turns_1_and_4(services_e2b, media_dir):
    img, aud = image_part(media_dir / "blue_square.jpg"), audio_part(media_dir / "tone_1p3s.flac")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [text_part("Look at this"), img]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "What colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Anything else?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": [aud, text_part("and this sound?")]},
        {"role": "assistant", "content": "A tone."},
        {"role": "user", "content": "Thanks"},
    ]
    r = _sync(services_e2b).chat.completions.create(model="m", messages=messages, max_tokens=3,
                                                    extra_body={"return_token_ids": True})
    ids = r.model_extra["prompt_token_ids"]
    turns, start = [], None
    for i, t in enumerate(ids):
        if t == 105:
            start = i
        elif t == 106:
            turns.append((start, i))
    # system + 9 turns closed, and the open model turn
    assert len(turns) == 10
    img_turn, aud_turn = turns[1], turns[7]
    assert img_turn[0] < ids.index(252) < ids.index(254) < img_turn[1]
    first_audio = ids.index(253)
    assert aud_turn[0] < ids.index(251) < first_audio and ids.index(255) < aud_turn[1]
    assert ids.count(253) == 33  # 1.3 s -> ceil(1300 / 40)
    assert r.usage.prompt_tokens == len(ids)


def test_seed_reproducibility_sync_and_async(services_e2b):
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me something"}], max_tokens=12,
              temperature=1.0, top_p=0.9, seed=42, logit_bias=NO_EOS)
    a = _sync(services_e2b).chat.completions.create(**kw, extra_body={"return_token_ids": True})

    async def run():
        c = _async(services_e2b)
        rs = await asyncio.gather(*(c.chat.completions.create(**kw, extra_body={"return_token_ids": True})
                                    for _ in range(3)))
        await c.close()
        return rs

    for r in asyncio.run(run()):
        assert r.choices[0].model_extra["token_ids"] == a.choices[0].model_extra["token_ids"]
    b = _sync(services_e2b).chat.completions.create(**{**kw, "seed": 43}, extra_body={"return_token_ids": True})
    assert b.choices[0].model_extra["token_ids"] != a.choices[0].model_extra["token_ids"]


async def _until_queued(dec, n: int, timeout_s: float = 30.0) -> None:
    url = re.search(r"metrics listening\s+address=(\S+)", dec.logs("decoder")).group(1)
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            text = (await http.get(url, timeout=5)).text
            if float(re.search(r"^mmserve_decoder_queue_depth ([0-9.e+-]+)$", text, re.M).group(1)) >= n:
                return
            await asyncio.sleep(0.01)
    raise TimeoutError(f"the decoder never had {n} request(s) queued")


def test_overload_is_a_rate_limit_error_with_retry_after(services_e2b):
    """One decoding slot and one queue place: the third concurrent request gets 429."""
    with start_decoder(services_e2b.checkpoint, ["--max-active", "1", "--max-queue", "1", "--metrics-port", "0"]) \
            as dec, \
            start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, dec.decoder_addr) as gw:
        url = f"http://127.0.0.1:{gw.gateway_port}/v1"

        async def run():
            c = AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
            long = dict(model="m", messages=[{"role": "user", "content": "go"}], max_tokens=2000, logit_bias=NO_EOS)
            first = asyncio.ensure_future(c.chat.completions.create(**long, stream=True))
            stream = await first
            await stream.__anext__()  # the first is decoding
            second = asyncio.ensure_future(c.chat.completions.create(**long, stream=True))
            await _until_queued(dec, 1)  # the second is queued (the decoder's gauge, polled)
            try:
                with pytest.raises(openai.RateLimitError) as ei:
                    await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                return ei.value
            finally:
                await stream.close()
                second.cancel()
                if second.done() and not second.cancelled() and second.exception() is None:
                    await second.result().close()
                await c.close()

        err = asyncio.run(run())
        assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
        assert "queue is full" in err.body["message"]

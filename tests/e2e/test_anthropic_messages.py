"""The Anthropic Messages front through the official ``anthropic`` SDK: sync, async and streamed
messages, an image, a tool-use round trip, forced tool choice, count_tokens equal to the real
prompt, typed errors, the system prompt rendered once, stop_sequences applied while generating,
and the thinking budget enforced by the decoder."""

from __future__ import annotations

import asyncio
import base64
import json

import anthropic
import httpx
import jsonschema
import pytest

from deploy.demo.media import shape_png
from mmserve_core.client import DecoderClient, TokenEvent
from tests.tooling.tiny_checkpoint import IDS

pytestmark = pytest.mark.e2e

TOOLS = [{"name": "get_weather", "description": "The weather now", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["city"]}}]


def _client(svc, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=svc.base_url.removesuffix("/v1"), api_key="x", max_retries=0, **kw)


def _png_block() -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                        "data": base64.b64encode(shape_png("red", "circle")).decode()}}


def test_sync_async_and_streamed_messages(services_e2b):
    c = _client(services_e2b)
    greedy = {"temperature": 0}  # the SDK has no temperature argument any more; the API does
    m = c.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}], extra_body=greedy)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "max_tokens"
    assert m.content[0].type == "text" and m.usage.output_tokens == 8 and m.id.startswith("msg_")

    async def go():
        ac = anthropic.AsyncAnthropic(base_url=services_e2b.base_url.removesuffix("/v1"), api_key="x",
                                      max_retries=0)
        return await ac.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                        extra_body=greedy)

    assert asyncio.run(go()).usage.output_tokens == 5
    with c.messages.stream(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                           extra_body=greedy) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "message_delta" in kinds
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8


def test_the_raw_event_sequence_is_anthropics(services_e2b):
    r = httpx.post(services_e2b.base_url + "/messages", timeout=60, json={
        "model": "m", "max_tokens": 6, "stream": True, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
    events = [line.removeprefix("event: ") for line in r.text.splitlines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "ping", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert all(d["type"] == e for d, e in zip(data, events))
    assert data[-2]["delta"]["stop_reason"] == "max_tokens" and data[-2]["usage"]["output_tokens"] == 6


def test_an_image_and_a_system_prompt_rendered_once(services_e2b):
    c = _client(services_e2b)
    system = "Answer in one short sentence about the colours you see."
    base = c.messages.count_tokens(model="m", messages=[{"role": "user", "content": "x"}]).input_tokens
    as_string = c.messages.count_tokens(model="m", system=system, messages=[{"role": "user", "content": "x"}])
    as_blocks = c.messages.count_tokens(model="m", system=[{"type": "text", "text": system}],
                                        messages=[{"role": "user", "content": "x"}])
    assert as_string.input_tokens == as_blocks.input_tokens
    assert as_string.input_tokens - base < 2 * len(system)  # once (byte tokens: about one per character)
    m = c.messages.create(model="m", max_tokens=4, system=[{"type": "text", "text": system}], messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, _png_block()]}])
    counted = c.messages.count_tokens(model="m", system=[{"type": "text", "text": system}], messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, _png_block()]}])
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == counted.input_tokens > as_blocks.input_tokens


def test_a_tool_use_round_trip_and_forced_choices(services_e2b):
    c = _client(services_e2b)
    schema = TOOLS[0]["input_schema"]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        for seed_msg in ("weather?", "and now?"):
            m = c.messages.create(model="m", max_tokens=200, tools=TOOLS, tool_choice=choice,
                                  messages=[{"role": "user", "content": seed_msg}])
            uses = [b for b in m.content if b.type == "tool_use"]
            assert m.stop_reason == "tool_use" and uses and not [b for b in m.content if b.type == "text"]
            for u in uses:
                jsonschema.validate(u.input, schema)
    one = c.messages.create(model="m", max_tokens=200, tools=TOOLS,
                            tool_choice={"type": "any", "disable_parallel_tool_use": True},
                            messages=[{"role": "user", "content": "weather?"}])
    assert len([b for b in one.content if b.type == "tool_use"]) == 1
    use = [b for b in one.content if b.type == "tool_use"][0]
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in one.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"},
                                            {"type": "text", "text": "so?"}]}]
    answer = c.messages.create(model="m", max_tokens=6, tools=TOOLS, messages=history)
    total = answer.usage.input_tokens + answer.usage.cache_read_input_tokens
    assert total > one.usage.input_tokens + one.usage.output_tokens
    with c.messages.stream(model="m", max_tokens=200, tools=TOOLS, tool_choice={"type": "any"},
                           messages=[{"role": "user", "content": "weather?"}]) as s:
        for _ in s:
            pass
        streamed = s.get_final_message()
    for u in [b for b in streamed.content if b.type == "tool_use"]:
        jsonschema.validate(u.input, schema)
    assert streamed.stop_reason == "tool_use"
    never = c.messages.create(model="m", max_tokens=8, tools=TOOLS, tool_choice={"type": "none"},
                              messages=[{"role": "user", "content": "weather?"}])
    assert not [b for b in never.content if b.type == "tool_use"]


def test_count_tokens_equals_the_real_prompt_length(services_e2b):
    c = _client(services_e2b)
    body = dict(model="m", system="Be brief.", tools=TOOLS, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, _png_block()]}])
    counted = c.messages.count_tokens(**body).input_tokens
    r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=60, json={
        "model": "m", "max_tokens": 1, "return_token_ids": True,
        "tools": [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                    "parameters": t["input_schema"]}} for t in TOOLS],
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + _png_block()["source"]["data"]}}]}]}).json()
    assert counted == len(r["prompt_token_ids"]) == r["usage"]["prompt_tokens"]


def test_stop_sequences_end_the_generation_itself(services_e2b):
    """Applied by the decoder while generating: nothing past the stop is streamed or billed."""
    c = _client(services_e2b)
    free = c.messages.create(model="m", max_tokens=40, messages=[{"role": "user", "content": "go"}],
                             extra_body={"temperature": 0})
    text = free.content[0].text
    stop = text[10:13]
    assert stop and stop in text
    m = c.messages.create(model="m", max_tokens=40, messages=[{"role": "user", "content": "go"}],
                          stop_sequences=[stop], extra_body={"temperature": 0})
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.index(stop)] and m.usage.output_tokens < free.usage.output_tokens


def test_typed_errors(services_e2b):
    c = _client(services_e2b)
    with pytest.raises(anthropic.BadRequestError) as ei:
        c.messages.create(model="m", max_tokens=5, messages=[])
    assert ei.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        c.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                          extra_body={"frobnicate": 1})
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_auth_takes_x_api_key_and_bearer(ckpt_e2b):
    from deploy.processes import start_services

    with start_services(ckpt_e2b, gateway_args=["--api-key", "sekret"]) as svc:
        good = _client(svc).with_options(api_key="sekret")
        assert good.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}]).content
        bearer = anthropic.Anthropic(base_url=svc.base_url.removesuffix("/v1"), auth_token="sekret", max_retries=0)
        assert bearer.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}]).content
        with pytest.raises(anthropic.AuthenticationError):
            _client(svc).with_options(api_key="wrong").messages.create(
                model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}])


def test_a_full_queue_is_a_rate_limit_error(ckpt_e2b):
    from deploy.processes import start_services

    with start_services(ckpt_e2b, decoder_args=["--max-active", "1", "--max-queue", "1"]) as svc:
        async def burst():
            ac = anthropic.AsyncAnthropic(base_url=svc.base_url.removesuffix("/v1"), api_key="x", max_retries=0)
            return await asyncio.gather(*(ac.messages.create(
                model="m", max_tokens=200, messages=[{"role": "user", "content": f"x{i}"}]) for i in range(8)),
                return_exceptions=True)

        results = asyncio.run(burst())
    assert any(isinstance(r, anthropic.RateLimitError) for r in results), results


def test_the_thinking_budget_closes_the_thought_channel(services_e2b):
    """The decoder allows only ``<channel|>`` once the budget is spent — here against a bias
    that would keep the channel open forever."""
    d = DecoderClient(services_e2b.decoder_addr)
    prompt = [IDS["<bos>"], IDS["<|turn>"], 300, IDS["<turn|>"], IDS["<|turn>"], IDS["<|channel>"]]
    bias = {IDS["<channel|>"]: -100.0, IDS["<|channel>"]: -100.0}

    def run(**kw) -> list[int]:
        return [t for ev in d.generate(prompt, max_tokens=12, temperature=1.0, seed=1, logit_bias=bias, **kw)
                if isinstance(ev, TokenEvent) for t in ev.token_ids]

    try:
        budgeted, free = run(reasoning_budget=5), run()
    finally:
        d.close()
    assert budgeted[5] == IDS["<channel|>"] and IDS["<channel|>"] not in budgeted[:5]
    assert IDS["<channel|>"] not in free  # without the budget the bias keeps the channel open

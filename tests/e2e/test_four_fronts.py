"""One conversation — a system prompt, a user turn with text, an image and a clip, an answer, a
second user turn — through all four fronts (OpenAI chat completions, the typed gRPC API,
Anthropic Messages, OpenAI Responses): the same prompt ids and the same greedy output ids.

The typed messages each front's parser makes are rendered by the gateway's prompt builder
in-process (the same ids, media blocks included); then each front answers the conversation
over the network, greedy, and every front returns the same tokens."""

from __future__ import annotations

import base64

import anthropic
import httpx
import openai
import pytest
from transformers import AutoTokenizer

from deploy.demo.media import shape_png, tone_wav
from gateway.fronts.anthropic.parse import parse_messages_request
from gateway.fronts.grpc_chat.codec import parse_chat_pb
from gateway.fronts.openai_chat.parse import parse_chat_request
from gateway.fronts.openai_responses.parse import conversation, parse_responses_request
from mmserve_core.client import Audio, ChatClient, Image, chat_request
from mmserve_core.prompt import PromptBuilder, PromptMedia
from mmserve_core.wire.types import MediaTokens
from tests.tooling.tiny_checkpoint import IDS

pytestmark = pytest.mark.e2e

SYSTEM, ASK, ANSWER, AGAIN = "Be brief.", "What is shown and heard?", "A red circle and a tone.", "And again?"
PNG, WAV = shape_png("red", "circle"), tone_wav(1.0)
B64_PNG, B64_WAV = base64.b64encode(PNG).decode(), base64.b64encode(WAV).decode()
MAX = 8


def openai_body() -> dict:
    return {"model": "m", "max_tokens": MAX, "temperature": 0, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": ASK},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64_PNG}"}},
                                     {"type": "input_audio", "input_audio": {"data": B64_WAV, "format": "wav"}}]},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": AGAIN}]}


def typed_messages() -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [ASK, Image(PNG), Audio(WAV)]},
            {"role": "assistant", "content": ANSWER}, {"role": "user", "content": AGAIN}]


def anthropic_body() -> dict:
    return {"model": "m", "max_tokens": MAX, "temperature": 0, "system": SYSTEM, "messages": [
        {"role": "user", "content": [{"type": "text", "text": ASK},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": B64_PNG}},
                                     {"type": "audio", "source": {"type": "base64", "media_type": "audio/wav",
                                                                  "data": B64_WAV}}]},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": AGAIN}]}


def responses_body() -> dict:
    return {"model": "m", "max_output_tokens": MAX, "temperature": 0, "instructions": SYSTEM, "store": False,
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": ASK},
                {"type": "input_image", "image_url": f"data:image/png;base64,{B64_PNG}"},
                {"type": "input_audio", "input_audio": {"data": B64_WAV, "format": "wav"}}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": ANSWER}]},
                {"role": "user", "content": AGAIN}]}


def _prompt_ids(builder: PromptBuilder, messages) -> list[int]:
    parts = [p for m in messages for p in m.parts if p.media is not None]
    rendered = builder.render(messages)
    return builder.build(rendered, [PromptMedia(p.media.modality, p.param, (7,), "h") for p in parts]).ids


def test_the_four_parsers_give_the_same_prompt_ids(ckpt_e2b):
    builder = PromptBuilder(AutoTokenizer.from_pretrained(ckpt_e2b), {
        "image": MediaTokens(IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"]),
        "audio": MediaTokens(IDS["<|audio|>"], IDS["<|audio>"], IDS["<audio|>"])})
    rr = parse_responses_request(responses_body())
    fronts = {
        "openai": parse_chat_request(openai_body()).messages,
        "grpc": parse_chat_pb(chat_request(typed_messages())).messages,
        "anthropic": parse_messages_request(anthropic_body()).messages,
        "responses": conversation([], rr),
    }
    ids = {name: _prompt_ids(builder, msgs) for name, msgs in fronts.items()}
    assert ids["openai"].count(IDS["<|image>"]) == 1 and ids["openai"].count(IDS["<|audio>"]) == 1
    assert ids["grpc"] == ids["openai"] and ids["anthropic"] == ids["openai"] and ids["responses"] == ids["openai"]


def test_the_four_fronts_answer_with_the_same_greedy_tokens(services_e2b):
    base = services_e2b.base_url
    tok = AutoTokenizer.from_pretrained(services_e2b.checkpoint)
    chat = httpx.post(base + "/chat/completions", timeout=120, json={**openai_body(), "return_token_ids": True}).json()
    want_ids, prompt_tokens = chat["choices"][0]["token_ids"], chat["usage"]["prompt_tokens"]
    want = tok.decode(want_ids, skip_special_tokens=False)
    assert len(want_ids) == MAX and len(chat["prompt_token_ids"]) == prompt_tokens

    with ChatClient(services_e2b.chat_addr) as c:
        reply = c.chat(typed_messages(), max_tokens=MAX, temperature=0, return_prompt_token_ids=True)
    assert reply.token_ids == want_ids and reply.prompt_token_ids == chat["prompt_token_ids"]

    a = anthropic.Anthropic(base_url=base.removesuffix("/v1"), api_key="x", max_retries=0)
    body = anthropic_body()
    m = a.messages.create(**{k: v for k, v in body.items() if k != "temperature"}, extra_body={"temperature": 0})
    assert m.content[0].text == want and m.usage.output_tokens == MAX
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == prompt_tokens

    r = openai.OpenAI(base_url=base, api_key="x", max_retries=0).responses.create(**responses_body())
    assert r.output_text == want and r.usage.output_tokens == MAX and r.usage.input_tokens == prompt_tokens

"""Structured outputs enforced by the decoder, on a random-weight checkpoint (which emits garbage
unconstrained): every reply parses and validates, streamed or not, over HTTP and the typed API."""

from __future__ import annotations

import json

import grpc
import httpx
import jsonschema
import openai
import pydantic
import pytest

from mmserve_core.client import ChatClient, Constraint
from mmserve_core.wire.stubs import chat_pb2_grpc
from tests.e2e import rpc_calls as R

pytestmark = pytest.mark.e2e


def _schema(i: int) -> dict:
    """Fifty schemas: nested objects, arrays, enums, bounded numbers, required and optional keys."""
    colour = {"enum": ["red", "green", "blue", "yellow"][: 2 + i % 3]}
    number = {"type": "number", "minimum": -5 - i, "maximum": 5 + i}
    integer = {"type": "integer", "minimum": 0, "maximum": 9 + i}
    word = {"type": "string", "maxLength": 1 + i % 4}
    flag = {"type": "boolean"}
    inner = {"type": "object", "properties": {"n": integer, "ok": flag}, "required": ["n"] if i % 2 else [],
             "additionalProperties": False}
    props = {"colour": colour, "size": number, "count": integer, "label": word, "inner": inner,
             "items": {"type": "array", "items": integer, "maxItems": 1 + i % 3},
             "tags": {"type": "array", "items": word, "minItems": i % 2, "maxItems": 2}}
    keys = list(props)[: 2 + i % 6]
    return {"type": "object", "properties": {k: props[k] for k in keys},
            "required": keys[: 1 + i % len(keys)], "additionalProperties": False}


SCHEMAS = [_schema(i) for i in range(50)]


def _client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


def test_50_json_schema_replies_validate_streamed_and_not(services_e2b):
    client, bad = _client(services_e2b), []
    for i, schema in enumerate(SCHEMAS):
        kw = dict(model="m", messages=[{"role": "user", "content": f"describe thing {i}"}], max_tokens=400,
                  temperature=1.0, seed=i,
                  response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                           "strict": True}})
        if i % 2:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            r = client.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        try:
            jsonschema.validate(json.loads(text), schema)
            assert finish == "stop"
        except Exception as e:  # noqa: BLE001 - collected, reported together
            bad.append((i, text, finish, repr(e)[:200]))
    assert not bad, bad[:5]


def test_json_object_replies_are_json_objects(services_e2b):
    """An unbounded object may run out of tokens on a random model (finish "length", a JSON prefix);
    one that finishes is a JSON object.  Unconstrained, the same model writes no JSON at all."""
    client = _client(services_e2b)
    for seed in range(6):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=300,
                                           temperature=1.0, seed=seed, response_format={"type": "json_object"})
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{")
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
    free = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                          temperature=1.0, seed=1)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


class Shape(pydantic.BaseModel):
    colour: str = pydantic.Field(max_length=6)
    sides: int = pydantic.Field(ge=0, le=12)
    filled: bool


def test_openai_parse_with_a_pydantic_model(services_e2b):
    r = _client(services_e2b).chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "a shape"}], max_tokens=300, temperature=1.0, seed=3,
        response_format=Shape)
    shape = r.choices[0].message.parsed
    assert isinstance(shape, Shape) and 0 <= shape.sides <= 12


def test_max_tokens_mid_object_is_length(services_e2b):
    r = _client(services_e2b).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=1.0, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[7]}})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


def test_a_schema_that_cannot_be_enforced_is_400_naming_response_format(services_e2b):
    r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "string", "pattern": "(?=a)b"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "look-around" in r.json()["error"]["message"]


def test_typed_api_constraints_json_schema_and_regex(services_e2b):
    with ChatClient(services_e2b.chat_addr) as c:
        for seed in range(5):
            reply = c.chat([{"role": "user", "content": "go"}], max_tokens=300, temperature=1.0, seed=seed,
                           constraint=Constraint("json_schema", json.dumps(SCHEMAS[seed])))
            jsonschema.validate(json.loads(reply.content), SCHEMAS[seed])
            digits = c.chat([{"role": "user", "content": "a number"}], max_tokens=20, temperature=1.0, seed=seed,
                            constraint=Constraint("regex", r"[0-9]{2,4}"))
            assert digits.content.isdigit() and 2 <= len(digits.content) <= 4, digits.content
    with grpc.insecure_channel(services_e2b.chat_addr) as ch, pytest.raises(grpc.RpcError) as ei:
        req = R.chat_req()
        req.chat.params.constraint.regex = "(?=x)"
        chat_pb2_grpc.ChatServiceStub(ch).CompleteUnary(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output constraint" in ei.value.details()


def test_concurrent_constrained_and_free_streams_share_the_batch(services_e2b):
    """Twelve at once — schema replies, forced tool calls and free text in one continuous batch
    (the masks applied to the whole step at once): every constrained one still validates."""
    import concurrent.futures

    client = _client(services_e2b)
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMAS[3]}}

    def one(i: int):
        kw = dict(model="m", messages=[{"role": "user", "content": f"go {i}"}], max_tokens=300, temperature=1.0,
                  seed=100 + i)
        if i % 3 == 0:
            return "free", client.chat.completions.create(**kw)
        if i % 3 == 1:
            return SCHEMAS[i], client.chat.completions.create(**kw, response_format={
                "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[i]}})
        return "tool", client.chat.completions.create(**kw, tools=[tool], tool_choice="required")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    for kind, r in results:
        msg = r.choices[0].message
        if kind == "tool":
            for c in msg.tool_calls:
                jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[3])
        elif kind != "free":
            jsonschema.validate(json.loads(msg.content), kind)

"""Tool calling through the OpenAI front on a random-weight checkpoint (which never calls a tool by
itself): forced calls always parse and validate, streamed calls equal non-streamed ones, every tool
field has its effect or is refused by name, and the markup never reaches ``content``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

pytestmark = pytest.mark.e2e

CALL_OPEN, CALL_CLOSE = 48, 49  # <|tool_call>, <tool_call|> in the tiny tokenizer


def _tools(i: int) -> list[dict]:
    """Tool sets: nested objects, arrays, enums, bounded numbers, required and optional keys."""
    weather = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 1 + i % 5, "description": "a city"},
        "days": {"type": "integer", "minimum": 1, "maximum": 3 + i % 5},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"] if i % 2 else ["city", "unit"]}
    search = {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 4},
        "filters": {"type": "object", "properties": {"lang": {"enum": ["en", "fr", "de"]},
                                                     "safe": {"type": "boolean"}}, "required": ["lang"]},
        "limit": {"type": "number", "minimum": 0, "maximum": 1 + i},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 1 + i % 2}},
        "required": ["query", "filters"][: 1 + i % 2]}
    return [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": weather}},
            {"type": "function", "function": {"name": "web_search", "parameters": search}},
            {"type": "function", "function": {"name": "ping"}}]


def _client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


def _check(calls, tools) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function"
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])


def _chat(client, stream: bool, **kw):
    """(content, tool calls, finish reason), streamed through the SDK's own accumulating helper."""
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].message.tool_calls or [], r.choices[0].finish_reason
    with client.chat.completions.stream(**kw) as s:
        for _ in s:
            pass
        r = s.get_final_completion()
    return r.choices[0].message.content, r.choices[0].message.tool_calls or [], r.choices[0].finish_reason


def test_50_forced_tool_calls_parse_and_validate_streamed_and_not(services_e2b):
    client, bad = _client(services_e2b), []
    for i in range(50):
        tools = _tools(i)
        choice = "required" if i % 2 else {"type": "function", "function": {"name": ["get_weather", "web_search"][i % 4 // 2]}}
        kw = dict(model="m", messages=[{"role": "user", "content": f"task {i}"}], tools=tools, tool_choice=choice,
                  max_tokens=300, temperature=1.0, seed=i)
        content, calls, finish = _chat(client, i % 3 == 0, **kw)
        try:
            _check(calls, tools)
            assert finish == "tool_calls" and not content
            if isinstance(choice, dict):
                assert {c.function.name for c in calls} == {choice["function"]["name"]}
        except Exception as e:  # noqa: BLE001 - collected, reported together
            bad.append((i, content, [(c.function.name, c.function.arguments) for c in calls], finish, repr(e)[:200]))
    assert not bad, bad[:5]


def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(services_e2b):
    client = _client(services_e2b)
    for seed in range(4):
        kw = dict(model="m", messages=[{"role": "user", "content": "go"}], tools=_tools(seed), tool_choice="required",
                  max_tokens=300, temperature=1.0, seed=seed)
        _, whole, _ = _chat(client, False, **kw)
        _, streamed, _ = _chat(client, True, **kw)
        assert [(c.function.name, c.function.arguments) for c in streamed] == \
               [(c.function.name, c.function.arguments) for c in whole]
        # and the raw chunks are OpenAI's shape: one entry per call index per chunk, the call's
        # first entry with id, type and name, later ones argument fragments only
        chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        for c in chunks:
            indexes = [tc.index for tc in c.choices[0].delta.tool_calls or []]
            assert len(indexes) == len(set(indexes)), c
        pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        firsts = {p.index: p for p in reversed(pieces)}
        assert all(p.id and p.type == "function" and p.function.name for p in firsts.values())
        assert all(p.id is None and p.function.name is None for p in pieces if firsts[p.index] is not p)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not any(c.choices[0].delta.content for c in chunks)


def test_parallel_tool_calls_false_makes_one_call(services_e2b):
    client = _client(services_e2b)
    for seed in range(6):
        _, calls, finish = _chat(client, False, model="m", messages=[{"role": "user", "content": "go"}],
                                 tools=_tools(seed), tool_choice="required", parallel_tool_calls=False,
                                 max_tokens=300, temperature=1.0, seed=seed)
        assert len(calls) == 1 and finish == "tool_calls"


def test_tool_choice_none_never_starts_a_call(services_e2b):
    """The call-open token is banned: even a bias toward it cannot start a call."""
    for seed in range(3):
        r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "go"}], "tools": _tools(seed), "tool_choice": "none",
            "logit_bias": {str(CALL_OPEN): 100}, "max_tokens": 20, "temperature": 1.0, "seed": seed,
            "return_token_ids": True}).json()
        choice = r["choices"][0]
        assert CALL_OPEN not in choice["token_ids"] and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] in ("stop", "length")


def test_auto_with_a_strict_tool_calls_validate(services_e2b):
    """``strict`` under ``auto``: the response is answer text or calls, and calls validate.  A bias
    toward the call-open token makes the random model take the call path (one call: the bias would
    start another after each)."""
    client = _client(services_e2b)
    tools = [dict(t, function={**t["function"], "strict": True}) for t in _tools(3)]
    for seed in range(5):
        _, calls, finish = _chat(client, seed % 2 == 1, model="m", messages=[{"role": "user", "content": "go"}],
                                 tools=tools, logit_bias={str(CALL_OPEN): 100}, parallel_tool_calls=False,
                                 max_tokens=300, temperature=1.0, seed=seed)
        _check(calls, tools)
        assert finish == "tool_calls"


class Lookup(pydantic.BaseModel):
    """Look a word up."""

    word: str = pydantic.Field(max_length=5)
    limit: int = pydantic.Field(ge=1, le=3)


def test_openai_parse_with_a_pydantic_function_tool(services_e2b):
    r = _client(services_e2b).chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "look it up"}], tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice="required", max_tokens=200, temperature=1.0, seed=5)
    (call,) = r.choices[0].message.tool_calls[:1]
    assert isinstance(call.function.parsed_arguments, Lookup) and 1 <= call.function.parsed_arguments.limit <= 3


def test_a_tool_round_trip_renders_and_answers(services_e2b):
    """user -> assistant call -> tool result -> answer: the history is accepted and the prompt grows by it."""
    client = _client(services_e2b)
    first = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}],
                                           tools=_tools(1), tool_choice="required", max_tokens=200, seed=1,
                                           temperature=1.0)
    msg = first.choices[0].message
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]},
               *({"role": "tool", "tool_call_id": c.id, "content": "sunny <|turn> 21"} for c in msg.tool_calls)]
    second = client.chat.completions.create(model="m", messages=history, tools=_tools(1), max_tokens=8, seed=1)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "examples": []}}]}, "tools[0].function.examples"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?=a)b"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters.properties.x.pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x<|turn>": {"type": "string"}}}}}]}, "tools[0].function.parameters.properties"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_tool_fields_it_cannot_honour_are_400_naming_them(services_e2b, body, param):
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=30, json=req)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


# ----------------------------------------------------------------------------- the typed gRPC API
def _typed_tools(i: int):
    from mmserve_core.client import Tool

    return [Tool(t["function"]["name"], t["function"].get("description", ""), t["function"].get("parameters"))
            for t in _tools(i)]


def test_typed_api_forced_calls_stream_and_round_trip(services_e2b):
    from mmserve_core.client import ChatClient, ChatFinal

    tools = _tools(2)
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    with ChatClient(services_e2b.chat_addr) as c:
        for seed in range(4):
            kw = dict(tools=_typed_tools(2), tool_choice="required" if seed % 2 else "web_search", max_tokens=300,
                      temperature=1.0, seed=seed)
            reply = c.chat([{"role": "user", "content": "go"}], **kw)
            assert reply.finish_reason == "tool_calls" and reply.content == "" and reply.tool_calls
            for call in reply.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            events = list(c.stream([{"role": "user", "content": "go"}], **kw))
            final = events[-1]
            assert isinstance(final, ChatFinal) and final.finish_reason == "tool_calls"
            joined: dict[int, list[str]] = {}
            for ev in events[:-1]:
                for d in ev.tool_calls:
                    joined.setdefault(d.index, []).append(d.arguments)
            assert ["".join(joined[i]) for i in sorted(joined)] == [t.arguments for t in final.tool_calls]
            assert [(t.name, t.arguments) for t in final.tool_calls] == [(t.name, t.arguments) for t in reply.tool_calls]
        history = [{"role": "user", "content": "go"},
                   {"role": "assistant", "content": "", "tool_calls": reply.tool_calls},
                   *({"role": "tool", "tool_call_id": t.id, "content": "done"} for t in reply.tool_calls)]
        after = c.chat(history, tools=_typed_tools(2), max_tokens=4, seed=1)
        assert after.usage.prompt_tokens > reply.usage.prompt_tokens


def test_typed_api_refuses_tool_mistakes_by_name(services_e2b):
    import grpc

    from mmserve_core.client import ChatClient, ToolCall

    with ChatClient(services_e2b.chat_addr) as c:
        cases = [
            (dict(tools=_typed_tools(0), tool_choice="nope"), "nope"),
            (dict(tool_choice="required"), "tool_choice"),
            (dict(messages=[{"role": "tool", "tool_call_id": "x", "content": "r"}]), "tool_call_id"),
            (dict(messages=[{"role": "assistant", "tool_calls": [ToolCall("c", "f", "[1]")]}]), "arguments_json"),
        ]
        for kw, needle in cases:
            msgs = kw.pop("messages", [{"role": "user", "content": "hi"}])
            with pytest.raises(grpc.RpcError) as ei:
                c.chat(msgs, max_tokens=2, **kw)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in ei.value.details(), \
                ei.value.details()


# ----------------------------------------------------------------------------- the real templates
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gemma4"


@pytest.fixture(scope="module", params=["chat_template.e-series.jinja", "chat_template.31b.jinja"])
def services_real(request, tmp_path_factory):
    """Services on a tiny checkpoint that ships a real Gemma 4 template (both generations)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} (the real templates) is absent")
    from deploy.processes import start_services
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("real") / request.param.split(".")[1],
                                 chat_template=(FIXTURES / request.param).read_text())
    with start_services(ckpt) as svc:
        yield svc


def test_tools_and_structured_outputs_on_the_real_templates(services_real):
    """Forced calls validate, streamed equals non-streamed, a round trip through the template's own
    result convention is served, and JSON-schema replies validate — on each real template."""
    client = _client(services_real)
    for seed in range(8):
        tools = _tools(seed)
        kw = dict(model="m", messages=[{"role": "user", "content": "go"}], tools=tools, tool_choice="required",
                  max_tokens=300, temperature=1.0, seed=seed)
        _, calls, finish = _chat(client, False, **kw)
        _check(calls, tools)
        assert finish == "tool_calls"
        if seed < 2:
            _, streamed, _ = _chat(client, True, **kw)
            assert [(c.function.name, c.function.arguments) for c in streamed] == \
                   [(c.function.name, c.function.arguments) for c in calls]
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
               *({"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in calls),
               {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "thanks"}]
    r = client.chat.completions.create(model="m", messages=history, tools=_tools(0), max_tokens=4, seed=1)
    assert r.usage.prompt_tokens > 0
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], seed=seed,
                                           max_tokens=100, temperature=1.0, response_format={
                                               "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)

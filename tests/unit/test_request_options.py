"""The options real clients send by default are honoured, on each front, or refused naming the field
as that front's API spells it: service tier, reasoning effort, prompt cache key, metadata, store,
truncation; a JSON format beside a forced tool call; one streamed tool-call entry per index."""

from __future__ import annotations

import pytest

from gateway.errors import HTTPError
from gateway.events import ToolCallDelta
from gateway.fronts.anthropic.parse import parse_messages_request
from gateway.fronts.openai_chat.format import tool_call_deltas
from gateway.fronts.openai_chat.parse import parse_chat_request
from gateway.fronts.openai_responses.parse import parse_responses_request
from gateway.pipeline import drop_oldest_turn
from gateway.request_options import EFFORT_BUDGETS
from gateway.tools.choice import plan_tools
from gateway.tools.grammar import Markers
from mmserve_core.wire import types as T

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
MARKERS = Markers(call_open=48, call_close=49, quote=52, channel_open=100, channel_close=101)
SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}


def _chat(**body):
    return parse_chat_request({"model": "m", "messages": USER, **body})


def _refused(parse, param: str, **body):
    with pytest.raises(HTTPError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)
    return e.value.message


@pytest.mark.parametrize("tier, priority, served", [
    (None, "default", "default"), ("auto", "default", "default"), ("default", "default", "default"),
    ("scale", "default", "default"), ("flex", "low", "flex"), ("priority", "high", "priority"),
    ("fast", "high", "priority")])
def test_openai_service_tiers_become_decoder_priorities(tier, priority, served):
    for req in (_chat(service_tier=tier),
                parse_responses_request({"model": "m", "input": "hi", "service_tier": tier}).chat):
        assert (req.priority, req.service_tier) == (priority, served)


def test_service_tier_refusals_name_the_field_on_each_front():
    _refused(_chat, "service_tier", service_tier="gold")
    _refused(lambda **b: parse_responses_request({"model": "m", "input": "hi", **b}), "service_tier",
             service_tier=3)
    anth = {"model": "m", "max_tokens": 5, "messages": USER}
    assert parse_messages_request({**anth, "service_tier": "standard_only"}).priority == "default"
    _refused(lambda **b: parse_messages_request({**anth, **b}), "service_tier", service_tier="priority")


@pytest.mark.parametrize("effort, thinking, budget", [
    ("none", False, None), ("minimal", False, None), ("low", True, EFFORT_BUDGETS["low"]),
    ("medium", True, EFFORT_BUDGETS["medium"]), ("high", True, EFFORT_BUDGETS["high"]), ("xhigh", True, None)])
def test_reasoning_effort_switches_the_thought_channel_with_a_growing_budget(effort, thinking, budget):
    chat = _chat(reasoning_effort=effort)
    resp = parse_responses_request({"model": "m", "input": "hi", "reasoning": {"effort": effort}}).chat
    for req in (chat, resp):
        assert bool(req.chat_template_kwargs.get("enable_thinking")) is thinking
        assert req.sampling.reasoning_budget == budget
    assert [EFFORT_BUDGETS[k] for k in ("low", "medium", "high")] == sorted(
        EFFORT_BUDGETS[k] for k in ("low", "medium", "high"))


def test_reasoning_effort_that_contradicts_enable_thinking_is_refused():
    msg = _refused(_chat, "reasoning_effort", reasoning_effort="none",
                   chat_template_kwargs={"enable_thinking": True})
    assert "enable_thinking" in msg
    _refused(_chat, "reasoning_effort", reasoning_effort="huge")
    assert _chat(reasoning_effort="high", chat_template_kwargs={"enable_thinking": True}).chat_template_kwargs[
        "enable_thinking"] is True


def test_store_metadata_cache_key_parsed_and_checked():
    req = _chat(store=True, metadata={"k": "v"}, prompt_cache_key="tenant-1", safety_identifier="u1")
    assert req.store and req.metadata == {"k": "v"} and req.cache_key == "tenant-1"
    assert not _chat().store
    _refused(_chat, "metadata", metadata={f"k{i}": "v" for i in range(17)})
    _refused(_chat, "metadata.k", metadata={"k": 3})
    _refused(_chat, "prompt_cache_key", prompt_cache_key="")
    _refused(_chat, "store", store="yes")


def test_responses_truncation_auto_or_disabled():
    def parse(**b):
        return parse_responses_request({"model": "m", "input": "hi", **b})

    assert parse(truncation="auto").chat.truncation == "auto"
    assert parse().chat.truncation == "disabled"
    _refused(parse, "truncation", truncation="middle")


def test_drop_oldest_turn_keeps_system_and_never_orphans_a_tool_result():
    def m(role, **kw):
        return T.Message(role, [T.Part("text", role, text=role)], role, **kw)

    call = T.ToolCall("c1", "f", "{}")
    conv = [m("system"), m("user"), m("assistant", tool_calls=[call]), m("tool", tool_call_id="c1"),
            m("assistant"), m("user"), m("assistant"), m("user")]
    once = drop_oldest_turn(conv)
    assert [x.role for x in once] == ["system", "user", "assistant", "user"]  # the call and its result together
    assert [x.role for x in drop_oldest_turn(once)] == ["system", "user"]
    assert drop_oldest_turn(drop_oldest_turn(once)) is None  # the last user turn is never dropped


def test_a_json_format_beside_a_forced_tool_call_forces_the_call():
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        req = _chat(tools=[TOOL], tool_choice=choice, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
        plan = plan_tools(req, MARKERS)
        assert plan.parse and req.sampling.constraint.kind == "lark"
        spec = req.sampling.constraint.spec
        assert '"x"' not in spec and "<[48]>" in spec  # the reply is the call (no answer branch), forced
    resp = parse_responses_request({"model": "m", "input": "hi", "tool_choice": "required", "tools": [
        {"type": "function", "name": "f", "parameters": TOOL["function"]["parameters"]}],
        "text": {"format": {"type": "json_schema", "name": "s", "schema": SCHEMA}}})
    assert plan_tools(resp.chat, MARKERS).parse


def test_a_constraint_that_cannot_join_tools_is_refused_by_the_fronts_own_name():
    resp = parse_responses_request({"model": "m", "input": "hi", "tools": [
        {"type": "function", "name": "f", "parameters": TOOL["function"]["parameters"]}],
        "text": {"format": {"type": "json_object"}}}).chat
    resp.sampling.constraint = T.Constraint("regex", "a+")
    with pytest.raises(HTTPError) as e:
        plan_tools(resp, MARKERS)
    assert e.value.param == "text.format"


def test_streamed_tool_call_pieces_are_one_entry_per_index():
    pieces = [ToolCallDelta(0, "call_1", "get_weather", ""), ToolCallDelta(0, None, None, "{"),
              ToolCallDelta(0, None, None, '"city"'), ToolCallDelta(1, "call_2", "f", ""),
              ToolCallDelta(1, None, None, "{}")]
    out = tool_call_deltas(pieces)
    assert [d["index"] for d in out] == [0, 1]
    assert out[0] == {"index": 0, "id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city"'}}
    assert out[1]["function"] == {"name": "f", "arguments": "{}"}
    assert tool_call_deltas([ToolCallDelta(0, None, None, "a"), ToolCallDelta(0, None, None, "b")]) == [
        {"index": 0, "function": {"arguments": "ab"}}]


def test_the_openapi_body_lists_exactly_the_keys_the_parser_honours():
    from gateway.fronts.openai_chat.parse import KNOWN_KEYS
    from gateway.fronts.openai_chat.routes import chat_openapi

    props = chat_openapi(("m",))["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(props) == set(KNOWN_KEYS)

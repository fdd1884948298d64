"""Gemma 4 tool-call parsing, differential against mlx-lm's and mlx-vlm's parsers on the same texts,
and streamed the way a decoder delivers text (any split): markup never in the answer text, the
streamed argument fragments reassembling to the same JSON."""

from __future__ import annotations

import json
import re

import pytest

from gateway.tools.parser import CLOSE, OPEN, ToolCallParser, ToolCallSyntaxError, parse_call

Q = '<|"|>'
BODIES = [
    f"call:get_weather{{city:{Q}Paris{Q},days:3}}",
    f"call:search{{query:{Q}a, b {{c}} and d{Q},limit:10,exact:true}}",
    "call:noop{}",
    f"call:set{{values:[1,2,3],nested:{{k:{Q}v{Q},n:null}},f:-2.5}}",
    f"call:say{{text:{Q}line one\nline: two{Q}}}",
    f"call:my-tool_v2{{x:{Q}{Q}}}",
]


@pytest.mark.parametrize("body", BODIES)
def test_same_calls_as_mlx_lm_and_mlx_vlm(body):
    from mlx_lm.tool_parsers import gemma4 as lm
    from mlx_vlm.tools.parsers import gemma4 as vlm

    ours = parse_call(body)
    for theirs in (lm.parse_tool_call(body), vlm.parse_tool_call(body)):
        assert ours.name == theirs["name"]
        args = theirs["arguments"]  # mlx-vlm returns JSON text, mlx-lm a mapping
        assert json.loads(ours.arguments) == (json.loads(args) if isinstance(args, str) else args)


def _stream(text: str, split: int):
    p, content, deltas = ToolCallParser(), [], []
    for i in range(0, len(text), split):
        c, got = p.feed(text[i:i + split])
        content.append(c)
        deltas += got
    content.append(p.finish())
    return p, "".join(content), deltas


def _reassemble(deltas):
    """What the ``openai`` client's stream helpers do: per index, the first id / name, arguments joined."""
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
        c["id"] = c["id"] or d.id
        c["name"] = c["name"] or d.name
        c["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 7, 11, 1000])
@pytest.mark.parametrize("body", BODIES)
def test_streamed_arguments_are_the_parsed_ones_in_any_split(body, split):
    p, content, deltas = _stream(f"{OPEN}{body}{CLOSE}", split)
    (call,) = _reassemble(deltas)
    ref = parse_call(body)
    assert content == "" and p.malformed == 0
    assert call["name"] == ref.name and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == json.loads(ref.arguments)
    assert [c.arguments for c in p.calls] == [call["arguments"]]
    assert deltas[0].arguments == "" and all(d.id is None for d in deltas[1:])


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 1000])
def test_streamed_in_any_split_the_markup_never_reaches_content(split):
    text = f"Let me check. {OPEN}{BODIES[0]}{CLOSE} and {OPEN}{BODIES[1]}{CLOSE}done <|tool"
    p, answer, deltas = _stream(text, split)
    calls = p.calls
    assert [c["name"] for c in _reassemble(deltas)] == ["get_weather", "search"]
    assert answer == "Let me check.  and done <|tool"  # a lone partial marker at the very end is text
    assert "call:" not in answer and OPEN not in answer and CLOSE not in answer
    assert [c.name for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[1].arguments)["query"] == "a, b {c} and d"


@pytest.mark.parametrize("bad", ["get_weather{}", "call:{}", f"call:f{{x:{Q}open}}", "call:f{x:}", "call:f{x:1"])
def test_malformed_calls_are_errors(bad):
    with pytest.raises(ToolCallSyntaxError):
        parse_call(bad)


@pytest.mark.parametrize("bad", ["get_weather{}", f"call:f{{x:{Q}open}}", "call:f{x:}"])
def test_a_malformed_call_is_still_a_call_never_content(bad):
    p, answer, _ = _stream(f"a {OPEN}{bad}{CLOSE} b", 3)
    assert answer == "a  b" and p.malformed == 1 and len(p.calls) == 1


def test_a_call_cut_off_by_max_tokens_stays_a_call_not_content():
    p = ToolCallParser()
    content, deltas = p.feed(f"hi {OPEN}call:f{{x:1")
    assert content == "hi " and deltas[0].name == "f"
    assert p.finish() == "" and p.malformed == 1
    assert p.calls[0].name == "f" and p.calls[0].arguments == '{"x":1'


def test_a_call_the_decoder_stopped_on_its_close_token_is_closed():
    p = ToolCallParser()
    p.feed(f"{OPEN}call:f{{x:{Q}y{Q}}}")
    assert p.in_call
    p.close_call()
    assert not p.in_call and json.loads(p.calls[0].arguments) == {"x": "y"} and p.malformed == 0


class _ScriptedCall:
    """A decoder ``Generate`` call that replays token events then a completion."""

    def __init__(self, texts: list[str], stop_token_id: int | None) -> None:
        from mmserve_core.wire import codec
        from mmserve_core.wire import types as T

        self._msgs = [codec.token_event_to_pb(T.TokenEvent([1], t)) for t in texts]
        self._msgs.append(codec.completion_to_pb(T.Completion("stop", 3, len(texts), 0, 0.0, 0.0, 0.0,
                                                              stop_token_id=stop_token_id)))

    async def read(self):
        import grpc

        return self._msgs.pop(0) if self._msgs else grpc.aio.EOF

    def cancel(self) -> None:
        pass

    def done(self) -> bool:
        return not self._msgs


def _events(texts: list[str], plan, stop_token_id: int | None = 50):
    import asyncio

    from gateway.events import Delta
    from gateway.pipeline import Generation
    from gateway.upstream.clients import DecoderStream

    async def go():
        call = _ScriptedCall(texts, stop_token_id)
        first = await call.read()
        gen = Generation(DecoderStream(call, first), [1, 2, 3], 0.0, plan)
        return [ev async for ev in gen.events()]

    evs = asyncio.run(go())
    deltas = [e for e in evs if isinstance(e, Delta)]
    return ("".join(d.content for d in deltas), "".join(d.reasoning for d in deltas),
            [t for d in deltas for t in d.tool_calls], evs[-1])


@pytest.mark.parametrize("split", [1, 4, 1000])
def test_reasoning_and_calls_are_split_from_the_answer_in_the_pipeline(split):
    """The thought channel first, then calls: neither in ``content``; a thought written inside a call
    never lands in its arguments; a finished call makes the finish reason ``tool_calls``."""
    from gateway.tools.choice import ToolPlan

    text = (f"<|channel>thought\nI should call<channel|>Sure.{OPEN}call:f{{x:<|channel>thought\nhmm<channel|>"
            f"{Q}a, b{Q},n:2}}{CLOSE}")
    texts = []  # as a decoder delivers it: each special token's text whole, other text in any split
    for piece in re.split(r"(<\|channel>|<channel\|>|<\|tool_call>|<tool_call\|>|<\|\"\|>)", text):
        texts += [piece] if piece.startswith("<") else [piece[i:i + split] for i in range(0, len(piece), split)]
    content, reasoning, deltas, done = _events(texts, ToolPlan(parse=True, close_id=None))
    assert content == "Sure." and reasoning == "I should callhmm"
    assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [("f", {"x": "a, b", "n": 2})]
    assert "".join(d.arguments for d in deltas) == done.tool_calls[0].arguments
    assert done.finish_reason == "tool_calls" and done.completion.finish_reason == "stop"


def test_without_tools_the_text_is_left_alone_and_the_close_token_stop_closes_a_call():
    from gateway.tools.choice import ToolPlan

    content, _, _, done = _events([f"a {OPEN}call:f{{}}{CLOSE}"], ToolPlan(parse=False, close_id=None))
    assert content == f"a {OPEN}call:f{{}}{CLOSE}" and done.finish_reason == "stop" and not done.tool_calls
    # parallel_tool_calls false: the decoder stopped on <tool_call|> (49), whose text it never emits
    content, _, _, done = _events([f"{OPEN}call:f{{x:1}}"], ToolPlan(parse=True, close_id=49), stop_token_id=49)
    assert content == "" and done.finish_reason == "tool_calls"
    assert json.loads(done.tool_calls[0].arguments) == {"x": 1}

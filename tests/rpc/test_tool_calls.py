"""Gemma 4 tool-call parsing, differential against mlx-lm's parser on the same texts, and streamed
the way a decoder delivers text (any split), markup never in the answer text."""

from __future__ import annotations

import json

import pytest

from gateway.tool_calls import CLOSE, OPEN, ToolCallParser, ToolCallSyntaxError, parse_call

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
def test_same_calls_as_mlx_lm(body):
    from mlx_lm.tool_parsers import gemma4

    theirs = gemma4.parse_tool_call(body)
    ours = parse_call(body)
    assert ours.name == theirs["name"]
    assert json.loads(ours.arguments) == theirs["arguments"]


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 1000])
def test_streamed_in_any_split_the_markup_never_reaches_content(split):
    text = f"Let me check. {OPEN}{BODIES[0]}{CLOSE} and {OPEN}{BODIES[1]}{CLOSE}done <|tool"
    p, content, calls = ToolCallParser(), [], []
    for i in range(0, len(text), split):
        c, got = p.feed(text[i:i + split])
        content.append(c)
        calls += got
    content.append(p.finish())
    answer = "".join(content)
    assert answer == "Let me check.  and done <|tool"  # a lone partial marker at the very end is text
    assert "call:" not in answer and OPEN not in answer and CLOSE not in answer
    assert [c.name for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[1].arguments)["query"] == "a, b {c} and d"


@pytest.mark.parametrize("bad", ["get_weather{}", "call:{}", f"call:f{{x:{Q}open}}", "call:f{x:}", "call:f{x:1"])
def test_malformed_calls_are_errors(bad):
    with pytest.raises(ToolCallSyntaxError):
        parse_call(bad)


def test_an_unterminated_call_is_an_error_not_content():
    p = ToolCallParser()
    assert p.feed(f"hi {OPEN}call:f{{x:1") == ("hi ", [])
    with pytest.raises(ToolCallSyntaxError):
        p.finish()

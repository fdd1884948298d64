"""Gemma 4's tool-call syntax: ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`` -> calls.

Why: tool-call markup leaking into ``content`` is the most common bug of the Gemma 4 servers on
Macs; the fix is a parser that owns the markers, streamed or not.  ``ToolCallParser.feed``
splits a text stream into answer text and complete calls, holding back only what could still
be the start of a marker, so the markup never reaches ``content``.  Arguments become JSON:
Gemma 4 writes bare keys and ``<|"|>``-delimited strings (anything inside them is text, braces
and commas included); numbers, ``true`` / ``false`` / ``null``, lists and nested objects are
JSON's own.  Tested differentially against mlx-lm's Gemma 4 parser on the same texts
(``tests/rpc/test_tool_calls.py``) without importing MLX here.  Pure Python, event loop.

Groundwork for issue 15's tool calling: the fronts do not use it yet (``tools`` is still
refused by name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

OPEN, CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's ``function.arguments``


class ToolCallSyntaxError(ValueError):
    """The model wrote a call that is not ``call:NAME{...}`` with well-formed arguments."""


def parse_call(body: str) -> ToolCall:
    """``call:NAME{args}`` (the text between the markers) -> ``ToolCall``."""
    body = body.strip()
    if not body.startswith("call:"):
        raise ToolCallSyntaxError(f"a tool call must start with 'call:', got {body[:40]!r}")
    brace = body.find("{")
    name = body[5:brace] if brace >= 0 else ""
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ToolCallSyntaxError(f"bad tool name {name!r}")
    value, end = _value(body, brace)
    if end != len(body):
        raise ToolCallSyntaxError(f"text after the arguments of {name}: {body[end:][:40]!r}")
    return ToolCall(name, json.dumps(value, ensure_ascii=False))


def _value(s: str, i: int):
    """One Gemma-4 argument value starting at ``s[i]`` -> ``(python value, index after it)``."""
    if s.startswith(QUOTE, i):
        j = s.find(QUOTE, i + len(QUOTE))
        if j < 0:
            raise ToolCallSyntaxError("an unterminated <|\"|> string")
        return s[i + len(QUOTE):j], j + len(QUOTE)
    if i < len(s) and s[i] == "{":
        out, i = {}, i + 1
        while i < len(s) and s[i] != "}":
            colon = s.find(":", i)
            key = s[i:colon].strip() if colon >= 0 else ""
            if not key:
                raise ToolCallSyntaxError(f"an object key is missing at {s[i:][:20]!r}")
            out[key.strip('"')], i = _value(s, colon + 1)
            if i < len(s) and s[i] == ",":
                i += 1
        if i >= len(s):
            raise ToolCallSyntaxError("an unterminated object")
        return out, i + 1
    if i < len(s) and s[i] == "[":
        out, i = [], i + 1
        while i < len(s) and s[i] != "]":
            v, i = _value(s, i)
            out.append(v)
            if i < len(s) and s[i] == ",":
                i += 1
        if i >= len(s):
            raise ToolCallSyntaxError("an unterminated list")
        return out, i + 1
    j = i
    while j < len(s) and s[j] not in ",}]":
        j += 1
    word = s[i:j].strip()
    try:
        return json.loads(word), j  # numbers, true / false / null, a JSON-quoted string
    except json.JSONDecodeError:
        raise ToolCallSyntaxError(f"bad value {word!r}") from None


class ToolCallParser:
    """Splits streamed text into answer text and complete tool calls (one per response)."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._buf:
            if not self._in_call:
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _partial_marker(self._buf, OPEN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i])
                self._buf, self._in_call = self._buf[i + len(OPEN):], True
            else:
                j = self._buf.find(CLOSE)
                if j < 0:
                    break
                calls.append(parse_call(self._buf[:j]))
                self._buf, self._in_call = self._buf[j + len(CLOSE):], False
        return "".join(content), calls

    def finish(self) -> str:
        """The end of the stream: held-back text that never became a marker is answer text; an
        unterminated call is an error (its markup must not reach ``content``)."""
        if self._in_call:
            raise ToolCallSyntaxError("the output ended inside a tool call")
        rest, self._buf = self._buf, ""
        return rest


def _partial_marker(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0

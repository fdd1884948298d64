"""Gemma 4's tool-call syntax: ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`` -> calls.

Why: tool-call markup leaking into ``content`` is the most common bug of the Gemma 4 servers on
Macs; the fix is a parser that owns the markers, streamed or not.  ``ToolCallParser.feed``
splits a text stream into answer text and tool-call deltas the way OpenAI streams them — per
call, its index, id and name first, then fragments of its JSON arguments as they are written —
holding back only what could still be the start of a marker, so the markup never reaches
``content``.  Arguments become JSON as they stream (``ArgumentsWriter``): Gemma 4 writes bare
keys and ``<|"|>``-delimited strings (anything inside them is text, braces and commas
included); numbers, ``true`` / ``false`` / ``null``, lists and nested objects are JSON's own.
A complete response's calls are the concatenation of its deltas, so streamed and not agree by
construction.  ``parse_call`` is the validating reference, tested differentially against
mlx-lm's Gemma 4 parser on the same texts (``tests/rpc/test_tool_calls.py``), and the streamed
arguments against it; no MLX here.  Pure Python, event loop.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from gateway.events import ToolCallDelta
from mmserve_core.wire.types import ToolCall

OPEN, CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's ``function.arguments``


class ToolCallSyntaxError(ValueError):
    """The model wrote a call that is not ``call:NAME{...}`` with well-formed arguments."""


def parse_call(body: str) -> ParsedCall:
    """``call:NAME{args}`` (the text between the markers) -> ``ParsedCall``."""
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
    return ParsedCall(name, json.dumps(value, ensure_ascii=False))


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


class ArgumentsWriter:
    """Gemma-4 argument syntax -> JSON text, incrementally (one per call)."""

    def __init__(self) -> None:
        self._stack: list[str] = []  # "{" / "["
        self._in_string = False
        self._key: list[str] | None = None  # the bare key being read, in an object
        self.done = False  # the outermost object closed

    def feed(self, text: str) -> str:
        """``text`` holds no partial ``<|"|>`` (the parser holds those back)."""
        out: list[str] = []
        i = 0
        while i < len(text) and not self.done:
            if self._in_string:
                j = text.find(QUOTE, i)
                chunk = text[i:] if j < 0 else text[i:j]
                out.append(json.dumps(chunk, ensure_ascii=False)[1:-1])
                if j < 0:
                    break
                out.append('"')
                self._in_string, i = False, j + len(QUOTE)
                continue
            if self._key is not None:
                c = text[i]
                if c == ":":
                    out.append(json.dumps("".join(self._key).strip().strip('"'), ensure_ascii=False) + ":")
                    self._key = None
                elif c == "}" and not "".join(self._key).strip():
                    self._key = None
                    continue  # an empty object, or a trailing comma: close below
                else:
                    self._key.append(c)
                i += 1
                continue
            if text.startswith(QUOTE, i):
                out.append('"')
                self._in_string, i = True, i + len(QUOTE)
                continue
            c = text[i]
            out.append(c)
            if c in "{[":
                self._stack.append(c)
                if c == "{":
                    self._key = []
            elif c in "}]":
                if self._stack:
                    self._stack.pop()
                self.done = not self._stack
            elif c == "," and self._stack and self._stack[-1] == "{":
                self._key = []
            i += 1
        return "".join(out)


class ToolCallParser:
    """Splits streamed text into answer text and ``ToolCallDelta``s (one parser per response)."""

    def __init__(self, new_id=None) -> None:
        self._buf = ""
        self._state = "text"  # text | head (after <|tool_call>, before "{") | args (before <tool_call|>)
        self._args: ArgumentsWriter | None = None
        self._body: list[str] = []
        self._new_id = new_id or _call_id
        self.calls: list[ToolCall] = []  # the complete calls so far (ids as streamed)
        self._current: list[str] = []  # this call's JSON so far
        self._name = self._id = self._head = ""
        self.malformed = 0  # calls whose text is not valid Gemma-4 call syntax

    @property
    def in_call(self) -> bool:
        return self._state != "text"

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._buf:
            if self._state == "text":
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _partial_marker(self._buf, OPEN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i])
                self._buf, self._state, self._body = self._buf[i + len(OPEN):], "head", []
            elif self._state == "head":
                brace, close = self._buf.find("{"), self._buf.find(CLOSE)
                if close >= 0 and (brace < 0 or close < brace):  # no arguments at all: malformed
                    self._start(self._buf[:close], deltas)
                    self._buf = self._buf[close:]
                    self._state = "args"
                    continue
                if brace < 0:
                    break
                self._start(self._buf[:brace], deltas)
                self._buf, self._state = self._buf[brace:], "args"
            else:
                j = self._buf.find(CLOSE)
                upto = j if j >= 0 else len(self._buf) - max(_partial_marker(self._buf, CLOSE),
                                                             _partial_marker(self._buf, QUOTE))
                piece, self._buf = self._buf[:upto], self._buf[upto:]
                self._body.append(piece)
                frag = self._args.feed(piece)
                if frag:
                    self._current.append(frag)
                    deltas.append(ToolCallDelta(len(self.calls), None, None, frag))
                if j < 0:
                    break
                self._buf = self._buf[len(CLOSE):]
                self._end()
        return "".join(content), deltas

    def _start(self, head: str, deltas: list[ToolCallDelta]) -> None:
        head = head.strip()
        self._name = head[5:] if head.startswith("call:") else head
        self._args, self._current, self._id, self._head = ArgumentsWriter(), [], self._new_id(), head
        deltas.append(ToolCallDelta(len(self.calls), self._id, self._name, ""))

    def _end(self) -> None:
        body = f"{self._head}{''.join(self._body)}"
        try:
            parse_call(body)
        except ToolCallSyntaxError:
            self.malformed += 1
        self.calls.append(ToolCall(self._id, self._name, "".join(self._current)))
        self._state = "text"

    def close_call(self) -> list[ToolCallDelta]:
        """The decoder stopped on ``<tool_call|>`` itself (one call only): it never reached the text."""
        if self._state == "text":
            return []
        _, deltas = self.feed(CLOSE)
        return deltas

    def finish(self) -> str:
        """The end of the stream: held-back text that never became a marker is answer text.  A
        call cut off (``max_tokens``) stays a call, its arguments as far as they were written:
        its markup must not reach ``content``."""
        if self._state == "args":
            self.malformed += 1
            self.calls.append(ToolCall(self._id, self._name, "".join(self._current)))
        elif self._state == "head":
            self.malformed += 1
        rest = self._buf if self._state == "text" else ""
        self._buf, self._state = "", "text"
        return rest


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_marker(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0

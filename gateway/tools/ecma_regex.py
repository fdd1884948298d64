"""ECMA-262 ``pattern`` → a regex llguidance enforces inside Gemma's string delimiters.

Why apart: JSON Schema patterns are ECMA searches; llguidance reads Rust regex.  ``search_regex``
reads anchors, ECMA's dot and class escapes as both ECMA and Python's ``re`` read them and refuses
what cannot be expressed (look-arounds, backreferences, ``\\b``); ``matches_something`` checks an
intersection is not empty.  Pure Python, on the thread that builds the grammar (see ``tools.grammar``)."""

from __future__ import annotations

import re
from typing import Any

from gateway.request import bad

# Class escapes as the sets both ECMA-262 and Python's ``re`` (what clients validate with) agree on:
# \d / \w ASCII (ECMA's, inside Python's Unicode ones), their complements outside both readings,
# \s the whitespace both count as such, \S what neither does.
_WS_BOTH = "\\t\\n\\x0B\\x0C\\r \\xA0\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

_WS_EITHER = _WS_BOTH + "\\x1C-\\x1F\\x85\\x{FEFF}"

_WORD_EITHER = "\\p{L}\\p{N}\\p{M}\\p{Pc}\\x{200C}\\x{200D}"

_CLASS_ESCAPES = {  # outside a class and inside a positive one: what both readings match
    "d": "[0-9]", "D": "[^\\p{Nd}]", "w": "[0-9A-Za-z_]", "W": f"[^{_WORD_EITHER}]",
    "s": f"[{_WS_BOTH}]", "S": f"[^{_WS_EITHER}]",
}

_NEGATED_ESCAPES = {  # inside [^…]: what either reading matches (so that neither matches the rest)
    "d": "\\p{Nd}", "D": "[^0-9]", "w": _WORD_EITHER, "W": "[^0-9A-Za-z_]",
    "s": _WS_EITHER, "S": f"[^{_WS_BOTH}]",
}

# llguidance's lexer gives up (mid-generation) on a long count intersected with a pattern: beside a
# pattern, a string's maxLength is capped here (a subset: shorter strings only) and its characters
# exclude '<' (so that the delimiter needs no third intersection).
PATTERN_LENGTH_CAP = 256

def search_regex(pattern: str) -> str:
    """A JSON Schema ``pattern`` (an unanchored ECMA-262 search) as a regex for ``/…/`` in
    llguidance's Lark that matches a whole string exactly when the pattern finds a match in it.
    ``ValueError`` names what cannot be translated."""
    from llguidance import LLMatcher, regex_to_lark

    alts = _EcmaReader(pattern).alternatives()
    out = "|".join(f"{'' if s else '(?s:.*)'}(?:{body}){'' if e else '(?s:.*)'}" for s, e, body in alts)
    rx = regex_to_lark(out, "")
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(f"start: X\nX: /{rx}/\n"))
    if error:
        line = next((x for x in error.splitlines() if x.startswith("error:")), error.splitlines()[0])
        raise ValueError(f"llguidance cannot compile it ({line.strip()[:120]})")
    return rx


class _EcmaReader:
    """One pass over an ECMA pattern: its top-level alternatives as ``(anchored at the start,
    anchored at the end, body in the regex crate's syntax)``."""

    def __init__(self, pattern: str) -> None:
        self.p, self.i, self.n = pattern, 0, len(pattern)
        self.alts: list[tuple[bool, bool, str]] = []
        self.cur: list[str] = []
        self.start = self.end = False
        self.depth = 0
        self.in_class: bool | str = False  # "^" inside a negated class

    def alternatives(self) -> list[tuple[bool, bool, str]]:
        while self.i < self.n:
            c = self.p[self.i]
            if c == "\\":
                self._escape()
            elif self.in_class:
                self._class_char(c)
            elif c == "[":
                self._open_class()
            else:
                self._char(c)
        self.alts.append((self.start, self.end, "".join(self.cur)))
        return self.alts

    def _escape(self) -> None:
        p, i, cur = self.p, self.i, self.cur
        if i + 1 >= self.n:
            raise ValueError("it ends with a lone backslash")
        nx = p[i + 1]
        if nx in "123456789" or nx == "k":
            raise ValueError("backreferences cannot be enforced")
        if nx in "bB" and not self.in_class:
            raise ValueError("word boundaries (\\b, \\B) cannot be enforced")
        if nx == "c":
            raise ValueError("control escapes (\\c) cannot be enforced")
        if nx in _CLASS_ESCAPES:
            cur.append((_NEGATED_ESCAPES if self.in_class == "^" else _CLASS_ESCAPES)[nx])
        elif nx == "0":
            cur.append("\\x00")
        elif nx == "/":
            cur.append("/")
        elif nx == "u" and p[i + 2:i + 3] == "{":
            j = p.find("}", i)
            cur.append("\\x" + p[i + 2:j + 1])
            self.i = j + 1
            return
        else:
            cur.append("\\" + nx)
        self.i += 2

    def _class_char(self, c: str) -> None:
        if c == "]":
            self.in_class = False
            self.cur.append(c)
        elif c == "[" or (c in "&-~" and self.p[self.i + 1:self.i + 2] == c):
            self.cur.append("\\" + c)  # literal in ECMA, set operators in the regex crate
        else:
            self.cur.append(c)
        self.i += 1

    def _open_class(self) -> None:
        p, i = self.p, self.i
        if p.startswith("[^]", i):
            self.cur.append("(?s:.)")
            self.i += 3
            return
        if p.startswith("[]", i):
            raise ValueError("an empty character class matches nothing")
        self.in_class = True
        self.cur.append("[")
        self.i += 1
        if p.startswith("^", self.i):
            self.cur.append("^")
            self.in_class = "^"
            self.i += 1

    def _char(self, c: str) -> None:
        p, i = self.p, self.i
        self.i += 1
        if c == "(":
            if p.startswith(("(?=", "(?!", "(?<=", "(?<!"), i):
                raise ValueError("look-arounds cannot be enforced")
            self.depth += 1
        elif c == ")":
            self.depth -= 1
        elif c == "|" and self.depth == 0:
            self.alts.append((self.start, self.end, "".join(self.cur)))
            self.cur, self.start, self.end = [], False, False
            return
        elif c == "^":
            if self.depth == 0 and not self.cur:
                self.start = True
                return
            raise ValueError("'^' inside the pattern (not at its start) cannot be enforced")
        elif c == "$":
            if self.depth == 0 and (i + 1 == self.n or p[i + 1] == "|"):
                self.end = True
                return
            raise ValueError("'$' inside the pattern (not at its end) cannot be enforced")
        elif c == ".":
            c = "[^\\n\\r\\x{2028}\\x{2029}]"  # ECMA's dot: no line terminator
        elif c == "{" and not re.match(r"\{\d+(,\d*)?\}", p[i:]):
            c = "\\{"  # not a quantifier: a literal brace in ECMA
        elif c == "}" and not re.search(r"\{\d+(,\d*)?$", p[:i]):
            c = "\\}"
        self.cur.append(c)

def literal_regex(text: str) -> str:
    """``text`` as a regex matching only itself (inside ``/…/``)."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else f"\\x{{{ord(c):X}}}" for c in text)

_probe: dict[str, Any] = {}

def matches_something(body: str, rule: bool = False) -> bool:
    """Whether a terminal's regex (or a rule's ``%json``) matches any text at all, asked of llguidance's
    lexer over a byte tokenizer.  An empty one (two patterns that exclude each other, a key pattern
    no bare key meets) would let the model into a value it can never finish."""
    hit = _probe.get(body)
    if hit is None:
        import numpy as np
        from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

        if "tokenizer" not in _probe:
            class _Bytes:  # one token per byte, and a stop token
                eos_token_id, bos_token_id = 256, None
                tokens = [bytes([i]) for i in range(256)] + [b"\xff[eos]"]
                special_token_ids = [256]

                def __call__(self, s):
                    return list(s)

            _probe["tokenizer"] = LLTokenizer(TokenizerWrapper(_Bytes()), slices=[])
        lark = f"start: x\nx: {body}\n" if rule else f"start: X\nX: {body}\n"
        m = LLMatcher(_probe["tokenizer"], LLMatcher.grammar_from_lark(lark), log_level=0)
        mask = None if m.is_error() else np.frombuffer(m.compute_bitmask(), dtype=np.uint32)
        if len(_probe) > 4096:  # a bounded cache (client schemas are unbounded)
            tokenizer = _probe["tokenizer"]
            _probe.clear()
            _probe["tokenizer"] = tokenizer
        hit = _probe[body] = mask is not None and not m.is_error() and bool(mask.any())
    return hit

def py_pattern(pattern: str, param: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise bad(f"{param}: the pattern {pattern!r} is not a valid regular expression ({e})", param) from None

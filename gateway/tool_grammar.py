"""Forced and strict tool calls as a grammar the decoder enforces token by token.

Why: other Gemma 4 servers only *hint* ``tool_choice: required`` in the prompt (0 of 20 valid
calls measured on mlx-vlm's server).  Here a forced call is a Lark grammar (llguidance's
dialect, compiled and applied in the decoder like any ``response_format``) of Gemma 4's own
call syntax — ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`` — with each
function's JSON Schema turned into that syntax: keys bare and in the order the template
renders them (its ``dictsort``: case-insensitive), strings between ``<|"|>`` tokens (the
delimiter itself cannot appear inside), numbers / booleans / null as JSON (bounded numbers
through llguidance's own ``%json``, whose syntax they share).  So the model writes what it was
trained to write, and the result always parses and validates.

How a schema becomes a grammar (``_Builder``):

* ``expand`` flattens one schema level into alternatives of plain keyword sets: a local
  ``$ref`` (``#``, ``#/definitions/…``, ``#/$defs/…``, any JSON pointer, a ``#name`` anchor) and
  ``allOf`` are merged in (exactly: types, enums, bounds and lengths intersected, ``multipleOf``
  to their least common multiple, properties merged key by key, ``required`` united — or
  refused where no exact merge exists); ``anyOf`` / ``oneOf`` multiply out with their sibling keywords merged into
  each branch; ``oneOf`` only where its branches are provably exclusive (``_Builder.excludes``:
  different JSON types, disjoint enums, or a property both require whose values are exclusive,
  or one forbids) — else 400; ``not`` of a type, enum or ``required``; ``dependencies`` /
  ``dependentRequired`` / ``dependentSchemas`` as two exact branches (trigger absent | trigger
  and its dependencies present).
* ``value`` gives each distinct subschema (a ``$ref`` target included) one Lark rule, memoised
  before its body is built, so a recursive ``$ref`` is a recursive rule.  Then ``_prune`` drops
  what can derive no finite text (a required property that refers back to its own schema): an
  optional one is left out, a tool with no finite object at all is refused.
* Keywords a validator ignores are ignored: unknown keywords and annotations (``id``,
  ``example``, ``readOnly``, …), ``format`` (an annotation by default since draft 2019-09),
  and every per-type keyword on a value of another type (``maxLength`` on the ``null`` of
  ``["string", "null"]``, ``required`` on a string).  Without ``type`` the value takes the
  types its keywords describe (``properties`` → an object).
* ``pattern`` (an unanchored ECMA-262 search) becomes a regex intersected with the string's
  length bounds inside the ``<|"|>`` delimiters (``search_regex``: its anchors, ECMA's dot and
  class escapes read as both ECMA and Python's ``re`` read them); what llguidance's regexes
  cannot express (look-arounds, backreferences, ``\\b``) is refused naming the pattern.
* Objects: the declared keys in template order, then extra keys (never a declared one; bare
  printable-ASCII names, ``_EXTRA_KEY``) under an ``additionalProperties`` schema, or under a
  ``patternProperties`` pattern (keys matching it and no other); with ``additionalProperties``
  absent or true and declared properties the object is closed to them (a valid subset),
  ``{"type": "object"}`` alone is any object.  ``min/maxProperties`` are counted (refused where
  two extra keys would be needed: a grammar cannot keep a key from being written twice).  A
  property name the call syntax cannot carry (``_key_problem``: a ``:`` ends a bare key, edge
  whitespace and quotes are stripped by the parser, …) is refused naming it.
* Every string or key regex is checked to match something (``_matches_something``): an empty
  intersection would let the model into a value it can never finish.
* Numbers without bounds are JSON numbers whose exponent and integer digits cannot overflow a
  double (so the arguments stay JSON).

A schema keyword the grammar cannot enforce exactly (``contains``, ``uniqueItems`` on a list of
two or more, ``if`` with ``else``, a ``not`` beyond the forms above, a remote ``$ref``, …) is
refused with 400 naming it — never a call that merely looks forced.  Deliberate subsets (a
closed object, a number's digits, a patterned string's length — ``PATTERN_LENGTH_CAP`` — and its
'<') only drop values; every value the grammar allows validates.  OpenAPI's ``nullable`` is not a
JSON Schema keyword: an annotation here, so no ``null`` is written where the type does not allow
it (a value both readings accept).  Pure Python, event loop (a build takes ~1 ms, p99 ~10 ms on
JSONSchemaBench); the token ids of the markers come from the checkpoint's tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from gateway.chat import bad
from gateway.errors import HTTPError
from mmserve_core.wire import types as T

QUOTE_TEXT = '<|"|>'
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
_OBJECT_KW = {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
              "maxProperties", "propertyNames", "_closed"}
_ARRAY_KW = {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}
_STRING_KW = {"minLength", "maxLength", "_patterns"}
_NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_LOWER = {"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"}
_UPPER = {"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"}
_COUNTS = {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
# validation keywords no exact grammar is built for (annotations and unknown keywords are ignored)
_REFUSED = {"contains", "minContains", "maxContains", "unevaluatedItems", "$recursiveRef", "$dynamicRef"}
_VALIDATION = ((_OBJECT_KW | _ARRAY_KW | _NUMBER_KW | _REFUSED) - {"_closed"}) | {
    "type", "enum", "const", "pattern", "minLength", "maxLength", "additionalItems", "unevaluatedProperties",
    "$ref", "allOf", "anyOf", "oneOf", "not", "if", "dependencies", "dependentRequired", "dependentSchemas"}
# Drafts whose validators know a keyword (others ignore it): what the grammar enforces must hold in
# every reading the schema's "$schema" allows (``_drafts``), and what an exclusivity proof relies on
# must be a constraint in all of them.
_KNOWN_IN = {"const": {7, 2019, 2020}, "propertyNames": {7, 2019, 2020}, "dependencies": {4, 7},
             "dependentRequired": {2019, 2020}, "dependentSchemas": {2019, 2020}, "prefixItems": {2020},
             "unevaluatedProperties": {2019, 2020}, "if": {7, 2019, 2020}}
_HUGE = 2 ** 31 - 1  # a count beyond any reply (and beyond llguidance's repetition bounds)
MAX_ALTERNATIVES = 64  # branches one schema level may multiply out to (anyOf x oneOf x dependencies …)
MAX_RULES = 20000  # a grammar larger than this is refused (llguidance compiles it in the decoder)
# Keys generated as extra keys (additionalProperties / patternProperties): printable ASCII without
# blanks and without what the call syntax or this grammar's regexes treat specially (" , : < [ \\ ]
# { | }); on ASCII, ECMA's and Python's regexes agree, so a key pattern means the same to both.
_EXTRA_KEY = "[\\x21\\x23-\\x2B\\x2D-\\x39\\x3B\\x3D-\\x5A\\x5E-\\x7A\\x7E]+"
_EXTRA_KEY_RE = re.compile(_EXTRA_KEY)
_NOT_QUOTE = '~/(?s:.*<\\|"\\|>.*)/'  # no string may hold the delimiter's text


@dataclass(frozen=True)
class Markers:
    """Token ids of the markers the grammar names (read from the tokenizer)."""

    call_open: int
    call_close: int
    quote: int
    channel_open: int | None = None
    channel_close: int | None = None


def _key_problem(key: str) -> str | None:
    """Why ``key`` cannot be written as a bare key that ``tool_calls.parse_call`` (and the streamed
    ``ArgumentsWriter``) read back as itself, or None.  The parser takes a key as the text up to
    the first ``:``, strips whitespace and ``"`` from its ends, and ends the object at a ``}``
    where a key would start; the template writes keys bare (``format_argument(escape_keys=False)``)."""
    if not key:
        return "an empty name cannot be written as a bare key"
    if ":" in key:
        return "':' ends a bare key in Gemma 4's call syntax (key:value)"
    if key != key.strip():
        return "whitespace at its ends is dropped when the call is read back"
    if key[0] == '"' or key[-1] == '"':
        return "a '\"' at its ends is dropped when the call is read back"
    if key[0] == "}":
        return "a leading '}' closes the object when the call is read back"
    if "<|" in key or "|>" in key:
        return "it holds control-token text"
    return None


def _canon(x: Any) -> str:
    if isinstance(x, dict):
        x = {k: v for k, v in x.items() if k != "_paths"}
    return json.dumps(x, sort_keys=True, ensure_ascii=False, default=str)


def _jkey(v: Any) -> str:
    """JSON equality as a key (1 == 1.0, true != 1)."""
    def norm(x):
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return x
        if isinstance(x, (int, float)):
            return int(x) if float(x).is_integer() and abs(x) < 2 ** 63 else x
        if isinstance(x, list):
            return [norm(y) for y in x]
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        return x
    return json.dumps(norm(v), sort_keys=True, ensure_ascii=False)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _type_ok(t: str, types) -> bool:
    return types is None or t in types or (t == "integer" and "number" in types)


def _meet_types(a, b):
    if a is None:
        return b
    if b is None:
        return a
    out = set()
    for t in a:
        if t in b:
            out.add(t)
        elif t == "integer" and "number" in b or t == "number" and "integer" in b:
            out.add("integer")
    return out


def _overlap(gen: set, declared: set) -> bool:
    nums = {"number", "integer"}
    return bool(gen & declared) or bool(gen & nums and declared & nums)


def _all_of(parts: list[tuple[Any, str]]) -> tuple[Any, str]:
    """The conjunction of (schema, path) parts as one schema (its parts' paths kept for refusals)."""
    items: list[tuple[Any, str]] = []

    def add(s, p):
        if s is True or s == {}:
            return
        if isinstance(s, dict) and set(s) <= {"allOf", "_paths"} and isinstance(s.get("allOf"), list) \
                and "_paths" in s:
            for x, q in zip(s["allOf"], s["_paths"]):
                add(x, q)
            return
        items.append((s, p))

    for s, p in parts:
        add(s, p)
    if any(s is False for s, _ in items):
        return False, parts[0][1]
    seen, uniq = set(), []
    for s, p in items:
        c = _canon(s)
        if c not in seen:
            seen.add(c)
            uniq.append((c, s, p))
    uniq.sort(key=lambda x: x[0])
    if not uniq:
        return True, parts[0][1] if parts else ""
    if len(uniq) == 1:
        return uniq[0][1], uniq[0][2]
    return {"allOf": [s for _, s, _ in uniq], "_paths": [p for _, _, p in uniq]}, uniq[0][2]


class _NoMerge(Exception):
    """Two keyword sets whose conjunction has no exact plain form."""


class _Unsat(Exception):
    """No value satisfies the keyword set."""


# ----------------------------------------------------------------------------- ECMA patterns
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

    alts: list[tuple[bool, bool, str]] = []
    cur: list[str] = []
    start = end = False
    depth, i, n = 0, 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("it ends with a lone backslash")
            nx = pattern[i + 1]
            if nx in "123456789" or nx == "k":
                raise ValueError("backreferences cannot be enforced")
            if nx in "bB" and not in_class:
                raise ValueError("word boundaries (\\b, \\B) cannot be enforced")
            if nx == "c":
                raise ValueError("control escapes (\\c) cannot be enforced")
            if nx in _CLASS_ESCAPES:
                cur.append((_NEGATED_ESCAPES if in_class == "^" else _CLASS_ESCAPES)[nx])
            elif nx == "0":
                cur.append("\\x00")
            elif nx == "/":
                cur.append("/")
            elif nx == "u" and pattern[i + 2:i + 3] == "{":
                j = pattern.find("}", i)
                cur.append("\\x" + pattern[i + 2:j + 1])
                i = j + 1
                continue
            else:
                cur.append(c + nx)
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
                cur.append(c)
            elif c == "[" or (c in "&-~" and pattern[i + 1:i + 2] == c):
                cur.append("\\" + c)  # literal in ECMA, set operators in the regex crate
            else:
                cur.append(c)
            i += 1
            continue
        if c == "[":
            if pattern.startswith("[^]", i):
                cur.append("(?s:.)")
                i += 3
                continue
            if pattern.startswith("[]", i):
                raise ValueError("an empty character class matches nothing")
            in_class = True
            cur.append(c)
            i += 1
            if pattern.startswith("^", i):
                cur.append("^")
                in_class = "^"
                i += 1
            continue
        if c == "(":
            if pattern.startswith(("(?=", "(?!", "(?<=", "(?<!"), i):
                raise ValueError("look-arounds cannot be enforced")
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            alts.append((start, end, "".join(cur)))
            cur, start, end = [], False, False
            i += 1
            continue
        elif c == "^":
            if depth == 0 and not cur:
                start = True
                i += 1
                continue
            raise ValueError("'^' inside the pattern (not at its start) cannot be enforced")
        elif c == "$":
            if depth == 0 and (i + 1 == n or pattern[i + 1] == "|"):
                end = True
                i += 1
                continue
            raise ValueError("'$' inside the pattern (not at its end) cannot be enforced")
        elif c == ".":
            cur.append("[^\\n\\r\\x{2028}\\x{2029}]")  # ECMA's dot: no line terminator
            i += 1
            continue
        elif c == "{" and not re.match(r"\{\d+(,\d*)?\}", pattern[i:]):
            cur.append("\\{")  # not a quantifier: a literal brace in ECMA
            i += 1
            continue
        elif c == "}" and not re.search(r"\{\d+(,\d*)?$", pattern[:i]):
            cur.append("\\}")
            i += 1
            continue
        cur.append(c)
        i += 1
    alts.append((start, end, "".join(cur)))
    out = "|".join(f"{'' if s else '(?s:.*)'}(?:{body}){'' if e else '(?s:.*)'}" for s, e, body in alts)
    rx = regex_to_lark(out, "")
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(f"start: X\nX: /{rx}/\n"))
    if error:
        line = next((x for x in error.splitlines() if x.startswith("error:")), error.splitlines()[0])
        raise ValueError(f"llguidance cannot compile it ({line.strip()[:120]})")
    return rx


def _drafts(root: Any) -> set[int]:
    """The JSON Schema drafts a validator may read ``root`` by: the one its ``$schema`` names, else
    draft 7 and 2020-12 (the usual defaults)."""
    uri = root.get("$schema") if isinstance(root, dict) else None
    if isinstance(uri, str):
        for names, draft in ((("draft-03", "draft-04"), 4), (("draft-06", "draft-07"), 7), (("2019-09",), 2019),
                             (("2020-12",), 2020)):
            if any(n in uri for n in names):
                return {draft}
    return {7, 2020}


def _anchor(node: Any, name: str, path: str) -> tuple[Any, str] | None:
    """The subschema whose ``$anchor`` is ``name`` or whose ``$id`` / ``id`` is ``#name``."""
    if isinstance(node, dict):
        if node.get("$anchor") == name or f"#{name}" in (node.get("$id"), node.get("id")):
            return node, path
        for k, v in node.items():
            if k not in ("enum", "const", "default", "examples"):
                hit = _anchor(v, name, f"{path}.{k}")
                if hit is not None:
                    return hit
    elif isinstance(node, list):
        for j, v in enumerate(node):
            hit = _anchor(v, name, f"{path}[{j}]")
            if hit is not None:
                return hit
    return None


def _literal_regex(text: str) -> str:
    """``text`` as a regex matching only itself (inside ``/…/``)."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else f"\\x{{{ord(c):X}}}" for c in text)


_probe: dict[str, Any] = {}


def _matches_something(body: str, rule: bool = False) -> bool:
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


def _py_pattern(pattern: str, param: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise bad(f"{param}: the pattern {pattern!r} is not a valid regular expression ({e})", param) from None


# ----------------------------------------------------------------------------- the builder
class _Builder:
    def __init__(self, m: Markers) -> None:
        self.m = m
        self.rules: list[str] = []
        self._bodies: dict[tuple[str, str], str] = {}
        self._memo: dict[tuple[int, str], str | None] = {}
        self._open: set[str] = set()  # rules whose body is being built (a reference to one is recursion)
        self._recursed: set[str] = set()
        self._n = 0
        self._needs_any = False
        self._regex: dict[str, str | ValueError] = {}
        self.tool, self.root, self.root_path = 0, {}, ""
        self.drafts = {7, 2020}
        self._inlining: list[str] = []  # $ref targets being merged in at the current level
        self._enums: dict[int, tuple[list, set[str]]] = {}

    # -- rules
    def _name(self, prefix: str) -> str:
        self._n += 1
        if self._n > MAX_RULES:
            raise bad(f"{self.root_path}: the schema needs a grammar of more than {MAX_RULES} rules", self.root_path)
        return f"{prefix}{self._n}"

    def new(self, body: str, prefix: str = "r") -> str:
        key = (prefix, body)
        hit = self._bodies.get(key)
        if hit is None:
            hit = self._bodies[key] = self._name(prefix)
            self.rules.append(f"{hit}: {body}")
        return hit

    def q(self) -> str:
        return f"<[{self.m.quote}]>"

    def begin_tool(self, i: int, root: Any, path: str) -> None:
        self.tool, self.root, self.root_path = i, root, path
        self.drafts = _drafts(root)

    # -- one schema -> one rule
    def value(self, s: Any, path: str) -> str | None:
        """The rule of the values ``s`` allows, or None when none does."""
        if s is True or s == {}:
            return self.any_value()
        if s is False:
            return None
        if not isinstance(s, dict):
            raise bad(f"{path} must be a JSON Schema object", path)
        key = (self.tool, _canon(s))
        if key in self._memo:
            name = self._memo[key]
            if name in self._open:
                self._recursed.add(name)
            return name
        name = self._name("r")
        self._memo[key] = name
        self._open.add(name)
        try:
            body = self.body(self.expand(s, path), path)
        finally:
            self._open.discard(name)
        if body is None:
            if name in self._recursed:
                raise bad(f"{path}: no value satisfies this recursive schema", path)
            self._memo[key] = None
            return None
        self.rules.append(f"{name}: {body}")
        return name

    def body(self, alts: list[dict], path: str) -> str | None:
        out: list[str] = []
        for f in alts:
            x = self.emit(f, path)
            if x is not None and x not in out:
                out.append(x)
        return " | ".join(out) if out else None

    # -- flattening one level
    def own(self, s: dict, path: str) -> tuple[dict, list[tuple[str, Any]]]:
        """``s``'s own keywords as a plain keyword set, and its in-place applicators (in order)."""
        f: dict[str, Any] = {"_src": {}}
        comb: list[tuple[str, Any]] = []
        for k, v in s.items():
            p = f"{path}.{k}"
            if k in ("$ref", "allOf", "anyOf", "oneOf", "not", "if", "dependencies", "dependentRequired",
                     "dependentSchemas"):
                if k in ("allOf", "anyOf", "oneOf") and (not isinstance(v, list) or not v):
                    raise bad(f"{p} must be a non-empty list", p)
                comb.append((k, v))
            elif k == "type":
                ts = v if isinstance(v, list) else [v]
                if not ts or any(t not in _TYPES for t in ts):
                    raise bad(f"{p}: {v!r} is not a JSON Schema type", p)
                f["type"] = set(ts)
            elif k in ("enum", "const"):
                vals = [v] if k == "const" else v
                if not isinstance(vals, list):
                    raise bad(f"{p} must be a list", p)
                if "enum" in f:
                    keys = {_jkey(x) for x in vals}
                    vals = [x for x in f["enum"] if _jkey(x) in keys]
                f["enum"] = list(vals)
            elif k in _COUNTS:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
                    raise bad(f"{p} must be a non-negative integer", p)
                if k in _UPPER and v > _HUGE:
                    continue  # no reply can be that long: no bound
                if v > _HUGE:
                    raise bad(f"{p}: {v} is more than any reply can hold", p)
                f[k] = int(v)
            elif k in ("minimum", "maximum", "multipleOf"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (k == "multipleOf" and v <= 0):
                    raise bad(f"{p} must be a {'positive ' if k == 'multipleOf' else ''}number", p)
                f[k] = v
            elif k in ("exclusiveMinimum", "exclusiveMaximum"):
                if not isinstance(v, (int, float)):
                    raise bad(f"{p} must be a number", p)
                # draft 4 reads it as a flag on minimum / maximum (any true value), later drafts as a
                # bound of its own (a boolean as 0 / 1): the grammar keeps what every reading keeps
                base = "minimum" if k == "exclusiveMinimum" else "maximum"
                if 4 in self.drafts and v and isinstance(s.get(base), (int, float)) \
                        and not isinstance(s.get(base), bool):
                    f["_x" + base] = True
                if self.drafts - {4}:
                    f["_b" + k] = int(v) if isinstance(v, bool) else v
                if (4 in self.drafts and not isinstance(v, bool)) or (self.drafts - {4} and isinstance(v, bool)):
                    f["_inexact"] = True  # the readings differ: no exclusivity proof rests on it
            elif k == "pattern":
                if not isinstance(v, str):
                    raise bad(f"{p} must be a string", p)
                f["_patterns"] = [(v, self.regex(v, p), p)]
            elif k == "items":
                if isinstance(v, list):  # draft 4-7 tuple: additionalItems is the rest
                    f["prefixItems"] = [(x, f"{p}[{j}]") for j, x in enumerate(v)]
                    f["items"] = (s.get("additionalItems", True), f"{path}.additionalItems")
                elif isinstance(v, (dict, bool)):
                    f["items"] = (v, p)
                else:
                    raise bad(f"{p} must be a schema or a list of schemas", p)
            elif k == "prefixItems":
                if not isinstance(v, list):
                    raise bad(f"{p} must be a list of schemas", p)
                f["prefixItems"] = [(x, f"{p}[{j}]") for j, x in enumerate(v)]
            elif k == "uniqueItems":
                if v is True:
                    f["uniqueItems"] = True
                    f["_src"][k] = p
            elif k == "properties":
                if not isinstance(v, dict):
                    raise bad(f"{p} must be an object", p)
                f["properties"] = {name: (x, f"{p}.{name}") for name, x in v.items()}
            elif k == "required":
                if isinstance(v, list):  # (draft 3's boolean is not a keyword since draft 4)
                    if not all(isinstance(x, str) for x in v):
                        raise bad(f"{p} must list property names", p)
                    f["required"] = {x: p for x in v}
            elif k == "additionalProperties":
                if not isinstance(v, (bool, dict)):
                    raise bad(f"{p} must be a schema", p)
                f[k] = (True if v == {} else v, p)
            elif k == "patternProperties":
                if not isinstance(v, dict):
                    raise bad(f"{p} must be an object", p)
                if v:
                    f[k] = {pat: (x, f"{p}.{pat}", _py_pattern(pat, f"{p}.{pat}")) for pat, x in v.items()}
            elif k == "propertyNames":
                if v is not True and v != {}:
                    f[k] = [(v, p)]
            elif k == "unevaluatedProperties":
                if v is False:
                    f["_closed"] = True
                elif v is not True and v != {}:
                    raise bad(f"{p}: an unevaluatedProperties schema cannot be enforced in a tool call", p)
            elif k in _REFUSED:
                if k == "unevaluatedItems" and v in (True, {}):
                    continue
                raise bad(f"{p}: the JSON Schema keyword {k!r} cannot be enforced in a tool call, so "
                          "tool_choice 'required' / a named function / strict cannot use it", p)
            # anything else is an annotation (description, format, examples, …) or unknown: ignored
        if "prefixItems" in s and isinstance(s.get("items"), (dict, bool)) and "prefixItems" in f:
            # 2020-12 reads items as the rest after prefixItems, draft 7 (which has no prefixItems) as
            # every item: a prefix item meets both, so either reading validates
            f["prefixItems"] = [_all_of([x, (s["items"], f"{path}.items")]) for x in f["prefixItems"]]
        for b, x in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            bounds = [f.pop("_b" + x)] if "_b" + x in f else []
            if f.pop("_x" + b, False) and b in f:
                bounds.append(f.pop(b))  # draft 4's exclusive minimum / maximum
            if bounds:
                f[x] = max(bounds) if x == "exclusiveMinimum" else min(bounds)
        for k in _KNOWN_IN:
            if k in s and not self.drafts <= _KNOWN_IN[k]:
                f["_inexact"] = True  # a validator of another draft ignores it: enforced, never relied on
        return f, comb

    def expand(self, s: Any, path: str) -> list[dict]:
        """One schema level as alternatives of plain keyword sets (their union is the schema)."""
        if s is True or s == {}:
            return [{"_src": {}}]
        if s is False:
            return []
        if not isinstance(s, dict):
            raise bad(f"{path} must be a JSON Schema object", path)
        base, comb = self.own(s, path)
        alts = [base]
        for k, v in comb:
            p = f"{path}.{k}"
            if k == "$ref":
                target, tpath = self.resolve(v, p)
                if tpath in self._inlining:
                    raise bad(f"{p}: {v!r} refers to itself without nesting, so no value can satisfy it", p)
                self._inlining.append(tpath)
                try:
                    alts = self.cross(alts, self.expand(target, tpath), p)
                finally:
                    self._inlining.pop()
                if self.drafts & {4, 7} and any(x in _VALIDATION and x != "$ref" for x in s):
                    for a in alts:  # draft 4-7 validators ignore a $ref's siblings: enforced, never relied on
                        a["_inexact"] = True
            elif k == "allOf":
                paths = s.get("_paths") or [f"{p}[{j}]" for j in range(len(v))]
                for x, q in zip(v, paths):
                    alts = self.cross(alts, self.expand(x, q), q)
            elif k == "anyOf":
                alts = self.cross(alts, [a for j, x in enumerate(v) for a in self.expand(x, f"{p}[{j}]")], p)
            elif k == "oneOf":
                groups = [self.cross(alts, self.expand(x, f"{p}[{j}]"), p) for j, x in enumerate(v)]
                for i in range(len(groups)):
                    for j in range(i + 1, len(groups)):
                        if not all(self.disjoint(a, b) for a in groups[i] for b in groups[j]):
                            raise bad(f"{p}: branches {i} and {j} are not provably exclusive (one value could "
                                      "match both), so 'exactly one' cannot be enforced in a tool call", p)
                alts = [a for g in groups for a in g]
            elif k == "not":
                alts = self.negate(alts, v, p)
            elif k == "if":
                if "then" in s or "else" in s:
                    if "else" in s:
                        raise bad(f"{path}.else: if / then / else cannot be enforced exactly in a tool call",
                                  f"{path}.else")
                    # "if and then" is a valid subset of "then, where if holds"
                    alts = self.cross(self.cross(alts, self.expand(v, p), p),
                                      self.expand(s["then"], f"{path}.then"), p)
                    for a in alts:
                        a["_inexact"] = True
            else:
                alts = self.dependencies(alts, k, v, p)
            if len(alts) > MAX_ALTERNATIVES:
                raise bad(f"{p}: the schema multiplies out to more than {MAX_ALTERNATIVES} alternatives", p)
        return alts

    def expand_apart(self, s: Any, path: str) -> list[dict]:
        """``expand`` of a nested subschema from within a level's expansion (a property's schema, an
        item's): its $refs are not merged into the level being expanded, so none is a cycle of it."""
        outer, self._inlining = self._inlining, []
        try:
            return self.expand(s, path)
        finally:
            self._inlining = outer

    def cross(self, alts: list[dict], others: list[dict], param: str) -> list[dict]:
        out = []
        for a in alts:
            for b in others:
                try:
                    out.append(_merge(a, b))
                except _Unsat:
                    continue
                except _NoMerge as e:
                    raise bad(f"{param}: {e} cannot be merged exactly, so it cannot be enforced in a tool call",
                              param) from None
        if len(out) > MAX_ALTERNATIVES:
            raise bad(f"{param}: the schema multiplies out to more than {MAX_ALTERNATIVES} alternatives", param)
        return out

    def resolve(self, ref: Any, param: str) -> tuple[Any, str]:
        if not isinstance(ref, str):
            raise bad(f"{param} must be a string", param)
        r = ref
        rid = self.root.get("$id", self.root.get("id")) if isinstance(self.root, dict) else None
        if isinstance(rid, str) and rid.split("#")[0] and r.startswith(rid.split("#")[0]):
            r = r[len(rid.split("#")[0]):]
        if r in ("", "#"):
            return self.root, self.root_path
        if r.startswith("#") and not r.startswith("#/"):  # a plain-name fragment: $anchor, draft-4/6 "#name" ids
            found = _anchor(self.root, r[1:], self.root_path)
            if found is None:
                raise bad(f"{param}: {ref!r} names no $anchor / id in this schema", param)
            return found
        if not r.startswith("#/"):
            raise bad(f"{param}: only local references ('#/…') can be enforced in a tool call, not {ref!r}", param)
        node, path = self.root, self.root_path
        for part in r[2:].split("/"):
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node, path = node[part], f"{path}.{part}"
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node, path = node[int(part)], f"{path}[{part}]"
            else:
                raise bad(f"{param}: {ref!r} does not resolve in this schema", param)
        return node, path

    def negate(self, alts: list[dict], v: Any, param: str) -> list[dict]:
        """``alts`` and not ``v``, for the forms of ``v`` that have an exact plain form."""
        if v is True or v == {}:
            return []
        if v is False:
            return alts
        if not isinstance(v, dict):
            raise bad(f"{param} must be a JSON Schema object", param)
        keys = {k for k in v if k in _VALIDATION}
        if keys == {"$ref"}:
            target, tpath = self.resolve(v["$ref"], f"{param}.$ref")
            if tpath in self._inlining:
                raise bad(f"{param}.$ref refers to itself", f"{param}.$ref")
            self._inlining.append(tpath)
            try:
                return self.negate(alts, target, param)
            finally:
                self._inlining.pop()
        if keys == {"anyOf"} and isinstance(v["anyOf"], list):
            for j, x in enumerate(v["anyOf"]):  # not (A or B) = not A and not B
                alts = self.negate(alts, x, f"{param}.anyOf[{j}]")
            return alts
        if keys == {"required"} and isinstance(v["required"], list) and v["required"]:
            # objects missing one of them (non-objects satisfy ``required``, so they fail the not)
            return self.cross(alts, [{"_src": {}, "properties": {r: (False, param)}, "type": {"object"}}
                                     for r in v["required"]], param)
        if keys == {"type"}:
            ts = set(v["type"] if isinstance(v["type"], list) else [v["type"]])
            if "integer" in ts and "number" not in ts:
                raise bad(f"{param}: 'not integer' (a number with a fraction) cannot be enforced in a tool call",
                          param)
            rest = set(_TYPES) - ts - ({"integer"} if "number" in ts else set())
            return self.cross(alts, [{"_src": {}, "type": rest}], param)
        if keys and keys <= {"enum", "const"}:
            banned = {_jkey(x) for x in (v.get("enum") or [])} | ({_jkey(v["const"])} if "const" in v else set())
            out = []
            for a in alts:
                if "enum" not in a:
                    raise bad(f"{param}: 'not' an enum cannot be enforced in a tool call unless the values are "
                              "listed", param)
                b = dict(a, enum=[x for x in a["enum"] if _jkey(x) not in banned])
                if b["enum"]:
                    out.append(b)
            return out
        raise bad(f"{param}: this form of 'not' cannot be enforced in a tool call", param)

    def dependencies(self, alts: list[dict], k: str, v: Any, param: str) -> list[dict]:
        """``a`` depends on ``b``: objects without ``a`` | objects with ``a`` and ``b`` (two exact branches)."""
        if not isinstance(v, dict):
            raise bad(f"{param} must be an object", param)
        for trigger, dep in v.items():
            p = f"{param}.{trigger}"
            absent = {"_src": {}, "properties": {trigger: (False, p)}}
            if isinstance(dep, list) and k != "dependentSchemas":
                if not all(isinstance(x, str) for x in dep):
                    raise bad(f"{p} must list property names", p)
                present = [{"_src": {}, "type": {"object"}, "required": {x: p for x in [trigger, *dep]}}]
            elif isinstance(dep, (dict, bool)) and k != "dependentRequired":
                present = self.cross([{"_src": {}, "type": {"object"}, "required": {trigger: p}}],
                                     self.expand(dep, p), p)
            else:
                raise bad(f"{p} must be {'a list of names' if k == 'dependentRequired' else 'a schema'}", p)
            out = []
            for a in alts:
                without = self.cross([a], [absent], p)
                with_it = self.cross([a], present, p)
                if with_it and not self.generates(a, trigger):
                    # the grammar never writes the trigger: only the branch without it, a subset
                    with_it = []
                    for b in without:
                        b["_inexact"] = True
                out += without + with_it
            alts = out
            if len(alts) > MAX_ALTERNATIVES:
                raise bad(f"{param}: the schema multiplies out to more than {MAX_ALTERNATIVES} alternatives", param)
        return alts

    def regex(self, pattern: str, param: str) -> str:
        hit = self._regex.get(pattern)
        if hit is None:
            try:
                hit = search_regex(pattern)
            except ValueError as e:
                hit = e
            self._regex[pattern] = hit
        if isinstance(hit, ValueError):
            raise bad(f"{param}: the pattern {pattern!r} cannot be enforced in a tool call: {hit}", param)
        return hit

    # -- what a keyword set generates
    def gen_types(self, f: dict) -> set | None:
        """The JSON types the grammar writes for ``f`` (None: any value)."""
        if "enum" in f:
            return {_json_type(v) for v in f["enum"]}
        t = f.get("type")
        if t is None:
            t = set()
            if any(k in f for k in _OBJECT_KW - {"_closed"}):
                t.add("object")
            if any(k in f for k in _ARRAY_KW):
                t.add("array")
            if any(k in f for k in _STRING_KW):
                t.add("string")
            if any(k in f for k in _NUMBER_KW):
                t.add("number")
            if not t:
                return None
        if "number" in t:
            t = t - {"integer"}
        return t

    def plan(self, f: dict, path: str) -> tuple[dict[str, tuple[Any, str]], list[tuple]] | None:
        """An object's declared keys (name -> (schema, path)) and its kinds of extra keys, each
        ``(key regexes to intersect, (schema, path), key -> bool)``; None when no object satisfies ``f``.

        Extra keys are bare identifier-like names (``_EXTRA_KEY``), never a declared one: under each
        pattern of ``patternProperties`` the keys matching it and no other pattern; under an
        ``additionalProperties`` schema the keys matching no pattern; with neither, and no declared
        property, any key and value (``{"type": "object"}``).  None under ``propertyNames``."""
        props: dict = f.get("properties", {})
        required: dict = f.get("required", {})
        ap = f.get("additionalProperties", (None, path))
        if f.get("_closed") and ap[0] in (None,):
            ap = (False, ap[1])
        pp: dict = f.get("patternProperties", {})
        keys: dict[str, tuple[Any, str]] = {}
        for k in list(props) + [r for r in required if r not in props]:
            parts = [props[k]] if k in props else []
            matched = [(x, q) for pat, (x, q, rx) in pp.items() if rx.search(k)]
            parts += matched
            if k not in props and not matched and ap[0] is not None:
                parts.append(ap)
            sch, q = _all_of(parts) if parts else (True, f"{path}.required")
            if sch is False:
                if k in required:
                    return None
                continue
            keys[k] = (sch, q)
        extras: list[tuple] = []
        if "propertyNames" in f:
            return keys, extras
        known = set(props) | set(required)
        banned = sorted(k for k in known if _EXTRA_KEY_RE.fullmatch(k))
        base = [f"/{_EXTRA_KEY}/"] + ([f"~/({'|'.join(map(_literal_regex, banned))})/"] if banned else [])
        pats = [(pat, self.regex(pat, q), x, q, rx) for pat, (x, q, rx) in pp.items()]

        def only(i):
            return lambda k: k not in known and bool(_EXTRA_KEY_RE.fullmatch(k)) and all(
                bool(p[4].search(k)) == (j == i) for j, p in enumerate(pats))

        for i, (_, rgx, x, q, _) in enumerate(pats):
            others = [f"~/{p[1]}/" for j, p in enumerate(pats) if j != i]
            extras.append(([*base, f"/{rgx}/", *others], (x, q), only(i)))
        if isinstance(ap[0], dict) or (ap[0] in (None, True) and not props and not pp):
            extras.append(([*base, *(f"~/{p[1]}/" for p in pats)], (ap[0] if ap[0] is not None else True, ap[1]),
                           only(-1)))
        return keys, extras

    def generates(self, f: dict, key: str) -> bool:
        """Whether the grammar of ``f`` may write ``key`` (a conservative yes)."""
        try:
            planned = self.plan(f, "")
        except HTTPError:
            return True
        if planned is None:
            return False
        keys, extras = planned
        return key in keys or any(pred(key) for _, _, pred in extras)

    # -- emission
    def emit(self, f: dict, path: str) -> str | None:
        if "enum" in f:
            vals, seen = [], set()
            for v in f["enum"]:
                if _jkey(v) not in seen and self.accepts(f, v, path):
                    seen.add(_jkey(v))
                    vals.append(v)
            return " | ".join(self.literal(v, f"{path}.enum") for v in vals) or None
        types = self.gen_types(f)
        if types is None:
            return self.any_value()
        out = []
        for t in _TYPES:
            if t in types:
                x = self.typed(t, f, path)
                if x is not None:
                    out.append(x)
        return " | ".join(out) or None

    def typed(self, t: str, f: dict, path: str) -> str | None:
        if t == "string":
            lo, hi = f.get("minLength", 0), f.get("maxLength")
            if hi is not None and hi < lo:
                return None
            patterns = [f"/{rx}/" for _, rx, _ in f.get("_patterns", [])]
            if not patterns:
                parts = [f"/(?s:.{{{lo},{'' if hi is None else hi}}})/", _NOT_QUOTE]
            elif hi is None and lo == 0:
                parts = [*patterns, _NOT_QUOTE]
            else:
                if hi is not None and lo <= PATTERN_LENGTH_CAP < hi:
                    hi = PATTERN_LENGTH_CAP
                parts = [f"/[^<]{{{lo},{'' if hi is None else hi}}}/", *patterns]
            body = " & ".join(parts)
            if not _matches_something(body):
                return None  # e.g. two patterns that exclude each other
            return f"{self.q()} {self.new(body, prefix='S')} {self.q()}"
        if t in ("integer", "number"):
            sub = {"type": t, **{k: f[k] for k in _NUMBER_KW if k in f}}
            if _empty_interval(f, t == "integer"):
                return None
            if len(sub) == 1:
                return self.plain_number(t)
            if not _matches_something(f"%json {json.dumps(sub)}", rule=True):
                return None  # e.g. no multiple of multipleOf within the bounds
            return self.new(f"%json {json.dumps(sub)}")
        if t == "boolean":
            return '"true" | "false"'
        if t == "null":
            return '"null"'
        if t == "array":
            return self.array(f, path)
        return self.obj(f, path)

    def plain_number(self, t: str) -> str:
        """A JSON number that a double holds (no 1e999): exponents of two digits, and at most 100
        integer digits beside a fraction or an exponent (an integer alone is exact at any size)."""
        if t == "integer":
            return self.new("/-?(0|[1-9][0-9]*)/", prefix="N")
        return self.new("/-?(0|[1-9][0-9]*)|-?(0|[1-9][0-9]{0,99})(\\.[0-9]+([eE][+-]?[0-9]{1,2})?|"
                        "[eE][+-]?[0-9]{1,2})/", prefix="N")

    def array(self, f: dict, path: str) -> str | None:
        prefix = f.get("prefixItems", [])
        rest, rest_path = f.get("items", (True, f"{path}.items"))
        lo, hi = f.get("minItems", 0), f.get("maxItems")
        elems: list[str] = []
        for j, (x, q) in enumerate(prefix):
            r = self.value(x, q)
            if r is None:
                hi = j if hi is None else min(hi, j)
                break
            elems.append(r)
        rest_rule = self.value(rest, rest_path) if len(elems) == len(prefix) else None
        if rest_rule is None:
            hi = len(elems) if hi is None else min(hi, len(elems))
        if hi is not None and hi < lo:
            return None
        if f.get("uniqueItems") and (hi is None or hi > 1):
            p = f["_src"].get("uniqueItems", f"{path}.uniqueItems")
            raise bad(f"{p}: uniqueItems cannot be enforced in a tool call (unless maxItems is at most 1)", p)

        def tail(i: int) -> str:
            """After ``i`` items: the rest of the list, its ``]`` included."""
            if i >= len(elems):
                a = max(0, lo - i)
                b = None if hi is None else hi - i
                if b == 0 or rest_rule is None:
                    return '"]"'
                return self.new(f'{_repeat(f"{chr(34)},{chr(34)} {rest_rule}", a, b)} "]"')
            opts = []
            if i >= lo:
                opts.append('"]"')
            if hi is None or i < hi:
                opts.append(f'"," {elems[i]} {tail(i + 1)}')
            return self.new(" | ".join(opts))

        first = elems[0] if elems else rest_rule
        opts = []
        if lo == 0:
            opts.append('"[" "]"')
        if first is not None and (hi is None or hi > 0):
            opts.append(f'"[" {first} {tail(1)}')
        return " | ".join(opts) or None

    def obj(self, f: dict, path: str) -> str | None:
        planned = self.plan(f, path)
        if planned is None:
            return None
        keys, extras = planned
        required = f.get("required", {})
        minp, maxp = f.get("minProperties", 0), f.get("maxProperties")
        names = [v for v in f.get("propertyNames", [])]
        items: dict[str, str] = {}
        for k in sorted(keys, key=lambda x: (x.lower(), x)):  # the template's dictsort (case-insensitive)
            sch, q = keys[k]
            if names and not all(any(self.accepts(a, k, p) for a in self.expand_apart(x, p)) for x, p in names):
                if k in required:
                    return None
                continue
            problem = _key_problem(k)
            if problem:
                param = q if k in f.get("properties", {}) else required.get(k, f"{path}.required")
                raise bad(f"{param}: the property name {k!r} cannot be used in a tool call: {problem}", param)
            r = self.value(sch, q)
            if r is None:
                if k in required:
                    return None
                continue
            items[k] = f"{json.dumps(k + ':', ensure_ascii=False)} {r}"
        if len(extras) == 1 and extras[0][1][0] is True and len(extras[0][0]) == 1 and not items and not minp \
                and maxp is None:
            return self.any_object()  # {"type": "object"}: any keys and values
        kinds = []
        for terms, sch, _ in extras:
            ev = self.value(*sch)
            if ev is not None and _matches_something(" & ".join(terms)):
                kinds.append(f'{self.new(" & ".join(terms), prefix="K")} ":" {ev}')
        extra_item = (kinds[0] if len(kinds) == 1 else self.new(" | ".join(kinds))) if kinds else None
        order = list(items)
        distinct: list[int] = []  # a minProperties that extra keys alone would have to reach
        if maxp is not None and len([k for k in order if k in required]) > maxp:
            return None
        cap = (maxp + 1) if maxp is not None else max(minp, 1)
        memo: dict[tuple[int, int], str | None] = {}

        def tail(i: int, k: int) -> str | None:
            """Keys ``order[i:]`` and the extras, ``k`` keys written so far; None: no way to finish."""
            if (i, k) in memo:
                return memo[(i, k)]
            if i == len(order):
                lo = max(0, minp - k)
                hi = None if maxp is None else maxp - k
                more = f'"," {extra_item}'
                if extra_item is None or hi == 0:
                    out = "" if lo == 0 else None
                elif lo > 1:  # a grammar cannot keep extra keys apart: two could be one key twice
                    distinct.append(lo)
                    out = None
                elif k > 0:
                    out = self.new(_repeat(more, lo, hi))
                elif lo == 0:
                    out = self.new(f"({' '.join(x for x in (extra_item, _repeat(more, 0, hi and hi - 1)) if x)})?")
                else:
                    out = self.new(" ".join(x for x in (extra_item, _repeat(more, lo - 1, hi and hi - 1)) if x))
            else:
                opts = []
                nk = min(k + 1, cap)
                nxt = tail(i + 1, nk) if maxp is None or k + 1 <= maxp else None
                if nxt is not None:
                    opts.append(" ".join(x for x in ('","' if k else "", items[order[i]], nxt) if x))
                if order[i] not in required:
                    skip = tail(i + 1, k)
                    if skip is not None:
                        opts.append(skip)
                if not opts:
                    out = None
                elif "" in opts:
                    rest = [o for o in opts if o]
                    out = self.new(f"({' | '.join(rest)})?") if rest else ""
                else:
                    out = self.new(" | ".join(opts))
            memo[(i, k)] = out
            return out

        inner = tail(0, 0)
        if inner is None:
            if distinct:
                p = f"{path}.minProperties"
                raise bad(f"{p}: {minp} properties would need {max(distinct)} distinct extra keys, which a tool "
                          "call's grammar cannot keep apart (the same key written twice counts once)", p)
            return None
        return f'"{{" {inner} "}}"' if inner else '"{" "}"'

    def literal(self, v: Any, param: str) -> str:
        if isinstance(v, str):
            if QUOTE_TEXT in v:
                raise bad(f"{param}: the value {v!r} holds the string delimiter {QUOTE_TEXT}", param)
            return f"{self.q()} {json.dumps(v, ensure_ascii=False)} {self.q()}" if v else f"{self.q()} {self.q()}"
        if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
            return json.dumps(json.dumps(v))
        if isinstance(v, list):
            inner = ' "," '.join(self.literal(x, param) for x in v)
            return f'"[" {inner} "]"' if v else '"[" "]"'
        parts = []
        for k in sorted(v, key=lambda x: (x.lower(), x)):
            problem = _key_problem(k)
            if problem:
                raise bad(f"{param}: the key {k!r} of a listed value cannot be written in a tool call: {problem}",
                          param)
            parts.append(f"{json.dumps(k + ':', ensure_ascii=False)} {self.literal(v[k], param)}")
        sep = ' "," '
        return f'"{{" {sep.join(parts)} "}}"' if parts else '"{" "}"'

    # -- what a keyword set accepts (exact, for listed values and exclusivity)
    def accepts(self, f: dict, v: Any, path: str) -> bool:
        t = _json_type(v)
        if "enum" in f and _jkey(v) not in self.enum_keys(f["enum"]):
            return False
        if not _type_ok(t, f.get("type")):
            return False
        if t == "string":
            if len(v) < f.get("minLength", 0) or ("maxLength" in f and len(v) > f["maxLength"]):
                return False
            return all(_py_pattern(p, q).search(v) for p, _, q in f.get("_patterns", []))
        if t in ("integer", "number"):
            x = Fraction(str(v)) if isinstance(v, float) else Fraction(v)
            for k, ok in (("minimum", lambda b: x >= b), ("maximum", lambda b: x <= b),
                          ("exclusiveMinimum", lambda b: x > b), ("exclusiveMaximum", lambda b: x < b)):
                if k in f and not ok(Fraction(str(f[k])) if isinstance(f[k], float) else Fraction(f[k])):
                    return False
            if "multipleOf" in f:
                m = Fraction(str(f["multipleOf"])) if isinstance(f["multipleOf"], float) else Fraction(f["multipleOf"])
                if (x / m).denominator != 1:
                    return False
            return True
        if t == "array":
            if len(v) < f.get("minItems", 0) or ("maxItems" in f and len(v) > f["maxItems"]):
                return False
            if f.get("uniqueItems") and len({_jkey(x) for x in v}) < len(v):
                return False
            prefix = f.get("prefixItems", [])
            rest = f.get("items", (True, path))
            for j, x in enumerate(v):
                sch, q = prefix[j] if j < len(prefix) else rest
                if not any(self.accepts(a, x, q) for a in self.expand_apart(sch, q)):
                    return False
            return True
        if t == "object":
            if any(r not in v for r in f.get("required", {})):
                return False
            if len(v) < f.get("minProperties", 0) or ("maxProperties" in f and len(v) > f["maxProperties"]):
                return False
            props, pp = f.get("properties", {}), f.get("patternProperties", {})
            ap = f.get("additionalProperties", (True, path))
            for k, x in v.items():
                parts = [props[k]] if k in props else []
                matched = [(s, q) for pat, (s, q, rx) in pp.items() if rx.search(k)]
                parts += matched
                if k not in props and not matched:
                    parts.append((False, path) if f.get("_closed") and ap[0] is True else ap)
                for sch, q in parts:
                    if not any(self.accepts(a, x, q) for a in self.expand_apart(sch, q)):
                        return False
            for sch, q in f.get("propertyNames", []):
                if not all(any(self.accepts(a, k, q) for a in self.expand_apart(sch, q)) for k in v):
                    return False
            return True
        return True

    def enum_keys(self, values: list) -> set[str]:
        hit = self._enums.get(id(values))
        if hit is None or hit[0] is not values:
            hit = self._enums[id(values)] = (values, {_jkey(x) for x in values})
        return hit[1]

    def excludes(self, a: dict, b: dict, depth: int = 0) -> bool:
        """No value the grammar writes for ``a`` validates against ``b`` (``b`` read as the client
        wrote it: declared types, listed values, ``required``)."""
        if b.get("_inexact") or depth > 4:
            return False
        try:
            if "enum" in a:
                return not any(self.accepts(b, v, "") for v in a["enum"] if self.accepts(a, v, ""))
            ga, tb = self.gen_types(a), b.get("type")
            if ga is not None and tb is not None and not _overlap(ga, tb):
                return True
            if "enum" in b and ga is not None and not any(_type_ok(_json_type(v), ga) for v in b["enum"]):
                return True
            if ga is None or not ga <= {"object"}:
                return False
            planned = self.plan(a, "")
            if planned is None:
                return True
            a_keys, _ = planned
            b_req, b_props = b.get("required", {}), b.get("properties", {})
            b_ap = b.get("additionalProperties", (True, ""))[0]
            for p in a.get("required", {}):
                if p not in a_keys:
                    continue
                if p in b_props and b_props[p][0] is False:
                    return True
                if p not in b_props and b_ap is False and not b.get("patternProperties"):
                    return True
                if p in b_req and p in b_props:
                    xa = self.expand_apart(*a_keys[p])
                    xb = self.expand_apart(*b_props[p])
                    if all(self.excludes(x, y, depth + 1) for x in xa for y in xb):
                        return True
            return any(not self.generates(a, p) for p in b_req)
        except HTTPError:
            return False

    def disjoint(self, a: dict, b: dict) -> bool:
        return self.excludes(a, b) and self.excludes(b, a)

    # -- any value
    def any_value(self) -> str:
        """A value of any type (a schema with no constraint), in Gemma 4's syntax."""
        if not self._needs_any:
            self._needs_any = True
            q = self.q()
            num = self.plain_number("number")
            self.rules += [
                f'gany: {q} GSTR {q} | {num} | "true" | "false" | "null" | gobj | glist',
                f"GSTR: /(?s:.*)/ & {_NOT_QUOTE}",
                'gobj: "{" "}" | "{" GKEY ":" gany ("," GKEY ":" gany)* "}"',
                "GKEY: /[A-Za-z_][A-Za-z0-9_]*/",
                'glist: "[" "]" | "[" gany ("," gany)* "]"',
            ]
        return "gany"

    def any_object(self) -> str:
        self.any_value()
        return "gobj"


def _repeat(item: str, lo: int, hi: int | None) -> str:
    """``item`` lo to hi times (hi None: unbounded) in llguidance's Lark ("" for none at all)."""
    if hi == 0:
        return ""
    return f"({item}){{{lo},{'' if hi is None else hi}}}"


def _frac(x) -> Fraction:
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def _empty_interval(f: dict, integer: bool) -> bool:
    """No number (integer) lies within ``f``'s bounds."""
    lows = [(_frac(f[k]), k == "exclusiveMinimum") for k in ("minimum", "exclusiveMinimum") if k in f]
    highs = [(_frac(f[k]), k == "exclusiveMaximum") for k in ("maximum", "exclusiveMaximum") if k in f]
    if not lows or not highs:
        return False
    lo, lo_x = max(lows, key=lambda x: (x[0], x[1]))
    hi, hi_x = min(highs, key=lambda x: (x[0], not x[1]))
    if integer:  # the least and the greatest integer within
        return (math.floor(lo) + 1 if lo_x else math.ceil(lo)) > (math.ceil(hi) - 1 if hi_x else math.floor(hi))
    return lo > hi or (lo == hi and (lo_x or hi_x))


def _merge(a: dict, b: dict) -> dict:
    """The conjunction of two plain keyword sets (``_Unsat`` if nothing satisfies both, ``_NoMerge``
    where the conjunction has no exact plain form)."""
    out = dict(a)
    out["_src"] = {**a.get("_src", {}), **b.get("_src", {})}
    if a.get("_inexact") or b.get("_inexact"):
        out["_inexact"] = True
    for k, v in b.items():
        if k in ("_src", "_inexact"):
            continue
        if k not in a:
            out[k] = v
            continue
        w = a[k]
        if k == "type":
            out[k] = _meet_types(w, v)
            if not out[k]:
                raise _Unsat()
        elif k == "enum":
            keys = {_jkey(x) for x in v}
            out[k] = [x for x in w if _jkey(x) in keys]
        elif k in _LOWER:
            out[k] = max(w, v)
        elif k in _UPPER:
            out[k] = min(w, v)
        elif k == "multipleOf":
            fw = Fraction(str(w)) if isinstance(w, float) else Fraction(w)
            fv = Fraction(str(v)) if isinstance(v, float) else Fraction(v)
            # multiples of both: multiples of their least common multiple (of fractions, exact)
            m = Fraction(math.lcm(fw.numerator, fv.numerator), math.gcd(fw.denominator, fv.denominator))
            out[k] = int(m) if m.denominator == 1 else float(m)
            if float(m) != m:
                raise _NoMerge(f"multipleOf {w} and multipleOf {v}")
        elif k in ("_patterns", "propertyNames"):
            out[k] = w + [x for x in v if x not in w]
        elif k in ("uniqueItems", "_closed"):
            out[k] = True
        elif k == "items":
            out[k] = _all_of([w, v])
        elif k == "prefixItems":
            rest_a, rest_b = a.get("items", (True, "")), b.get("items", (True, ""))
            n = max(len(w), len(v))
            out[k] = [_all_of([w[j] if j < len(w) else rest_a, v[j] if j < len(v) else rest_b]) for j in range(n)]
        elif k == "required":
            out[k] = {**w, **v}
        elif k == "properties":
            out[k] = _merge_props(a, b)
        elif k == "additionalProperties":
            out[k] = _all_of([w, v])
        elif k == "patternProperties":
            merged = dict(w)
            for pat, (x, q, rx) in v.items():
                merged[pat] = (*_all_of([merged[pat][:2], (x, q)]), rx) if pat in merged else (x, q, rx)
            out[k] = merged
        elif w != v:
            raise _NoMerge(f"{k} {w!r} and {k} {v!r}")
    if "properties" in b and "properties" not in a or "properties" in a and "properties" not in b:
        out["properties"] = _merge_props(a, b)
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
        if lo in out and hi in out and out[lo] > out[hi]:
            types = out.get("type")
            owner = {"minLength": "string", "minItems": "array", "minProperties": "object"}[lo]
            if types is not None and types <= {owner}:
                raise _Unsat()
    if "enum" in out and not out["enum"]:
        raise _Unsat()
    return out


def _merge_props(a: dict, b: dict) -> dict:
    """Properties of a conjunction: a key only one side declares also meets the other side's
    patternProperties / additionalProperties."""
    pa, pb = a.get("properties", {}), b.get("properties", {})
    out = {}
    for k in [*pa, *(k for k in pb if k not in pa)]:
        parts = []
        for mine, other, side in ((pa, pb, b), (pb, pa, a)):
            if k in mine:
                parts.append(mine[k])
            if k in mine and k not in other:
                matched = [(x, q) for pat, (x, q, rx) in side.get("patternProperties", {}).items() if rx.search(k)]
                parts += matched
                ap = side.get("additionalProperties")
                if not matched and ap is not None:
                    parts.append(ap)
                elif not matched and side.get("_closed"):
                    parts.append((False, ""))
        out[k] = _all_of(parts)
    return out


# ----------------------------------------------------------------------------- productivity
# A required property whose schema refers back to itself has no finite value: its rule would force
# an endless expansion (llguidance fails on it mid-generation).  After the build, every rule that
# cannot derive a finite text is found (a fixpoint) and every reference to one is dropped where it
# is optional, its alternative where it is not.  Parsed here: exactly the syntax this module writes.
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<tok><\[\d+\]>)|(?P<json>%json\s*)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)'
                    r'|(?P<rep>\{\d+,\d*\})|(?P<op>[()|?*+]))')


def _parse(body: str) -> list:
    """A rule body -> alternatives, each a list of (atom, min count) where atom is ("lit", text),
    ("ref", name) or ("group", alternatives)."""
    pos, stack, alts, cur = 0, [], [], []
    while pos < len(body):
        if body[pos:].strip() == "":
            break
        m = _TOKEN.match(body, pos)
        if m is None:
            raise ValueError(f"cannot read {body[pos:pos + 30]!r}")
        pos = m.end()
        if m.group("json") is not None:
            _, end = json.JSONDecoder().raw_decode(body, pos)
            cur.append([("lit", body[m.start():end]), 1])
            pos = end
        elif m.group("str") or m.group("tok"):
            cur.append([("lit", m.group(0).strip()), 1])
        elif m.group("name"):
            cur.append([("ref", m.group("name")), 1])
        elif m.group("rep"):
            cur[-1][1] = int(m.group("rep")[1:].split(",")[0]) * cur[-1][1]
            cur[-1].append(m.group("rep"))
        else:
            op = m.group("op")
            if op == "(":
                stack.append((alts, cur))
                alts, cur = [], []
            elif op == ")":
                group = [*alts, cur]
                alts, cur = stack.pop()
                cur.append([("group", group), 1])
            elif op == "|":
                alts.append(cur)
                cur = []
            else:
                cur[-1][1] = 0 if op in "?*" else cur[-1][1]
                cur[-1].append(op)
    return [*alts, cur]


def _write(alts: list) -> str:
    def alt(items):
        out = []
        for atom, _, *post in items:
            kind, x = atom
            text = x if kind != "group" else f"({' | '.join(alt(a) for a in x)})"
            out.append(text + "".join(post))
        return " ".join(out)
    return " | ".join(alt(a) for a in alts)


def _keep(alts: list, live: set[str]) -> list | None:
    """``alts`` without what derives no finite text (None: nothing is left)."""
    out = []
    for items in alts:
        new = []
        for atom, low, *post in items:
            kind, x = atom
            ok = True
            if kind == "ref":
                ok = x in live or x[0].isupper()
            elif kind == "group":
                inner = _keep(x, live)
                ok, atom = inner is not None, ("group", inner)
            if ok:
                new.append([atom, low, *post])
            elif low > 0:
                break
        else:
            out.append(new if new else [[("lit", '""'), 1]])
    return out or None


def _prune(rules: list[str]) -> tuple[list[str], set[str]]:
    """The rules with what derives no finite text removed, and the names of the rules left."""
    parsed, terminals = {}, []
    for r in rules:
        name, body = r.split(": ", 1)
        if name[0].isupper():
            terminals.append(r)
        else:
            parsed[name] = _parse(body)
    live: set[str] = set()
    while True:
        more = {n for n, a in parsed.items() if n not in live and _keep(a, live) is not None}
        if not more:
            break
        live |= more
    if len(live) == len(parsed):
        return rules, live
    return [f"{n}: {_write(_keep(a, live))}" for n, a in parsed.items() if n in live] + terminals, live


def tool_call_grammar(tools: list[T.Tool], markers: Markers, *, choice: str, name: str | None = None,
                      parallel: bool = True, thinking: bool = False, answer: T.Constraint | None = None,
                      schema_path: str = "tools[{i}].function.parameters") -> str:
    """The Lark grammar of a response under ``choice``:

    * ``required`` — one call (or several, with ``parallel``) of any declared tool, nothing else;
    * ``function`` — a call of ``name``;
    * ``auto`` (strict tools) — answer text, or calls; with ``answer`` (a JSON ``response_format``)
      the answer is that JSON instead of free text, as compact as without tools.

    ``thinking`` lets a thought channel come first (the request turned thinking on);
    ``schema_path`` is how the front names tool ``{i}``'s schema in a refusal."""
    b = _Builder(markers)
    fns = [t for t in tools if choice != "function" or t.name == name]
    alts = []
    for i, t in enumerate(tools):
        if t not in fns:
            continue
        params = t.parameters if t.parameters is not None else {"type": "object", "properties": {},
                                                                 "additionalProperties": False}
        where = schema_path.format(i=i)
        if not isinstance(params, (dict, bool)):
            raise bad(f"{where} must be a JSON Schema of type object", where)
        b.begin_tool(i, params, where)
        try:
            objs = b.cross(b.expand(params, where), [{"_src": {}, "type": {"object"}}], where)
            if not objs:
                raise bad(f"{where} must be a JSON Schema of type object", where)
            body = b.body(objs, where)
        except RecursionError:
            raise bad(f"{where}: the schema nests too deeply to be enforced in a tool call", where) from None
        if body is None:
            raise bad(f"{where}: no object satisfies this schema", where)
        alts.append((where, f"{json.dumps('call:' + t.name)} {b.new(body)}"))
    rules, live = _prune(b.rules)
    b.rules = rules
    for where, alt in alts:
        if alt.split()[-1] not in live:
            raise bad(f"{where}: no finite object satisfies this schema (a required property refers back to "
                      "its own schema)", where)
    alts = [alt for _, alt in alts]
    call = b.new(f"<[{markers.call_open}]> ({' | '.join(alts)}) <[{markers.call_close}]>", prefix="call")
    calls = f"{call}+" if parallel else call
    if choice == "auto":
        if answer is not None:
            body = f"%json {json.dumps(answer_schema(answer))} | {calls}"
        else:
            body = f"TEXT? {calls} | TEXT"
            b.rules.append("TEXT: /(?s:.+)/")
    else:
        body = calls
    if thinking and markers.channel_open is not None and markers.channel_close is not None:
        b.rules.append(f"thought: <[{markers.channel_open}]> THOUGHT <[{markers.channel_close}]>")
        b.rules.append("THOUGHT: /(?s:.*)/")
        body = f"thought? ({body})"
    return "\n".join([f"start: {body}", *b.rules]) + "\n"


# What the decoder compiles a plain JSON response_format with (decoder_service.constraints
# _JSON_OPTIONS): compact JSON, and never an inexact mode.  Inside a Lark grammar's %json the options
# come from the schema's own "x-guidance" only, so this one replaces the client's.
ANSWER_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": False, "lenient": False}


def answer_schema(answer: T.Constraint) -> dict:
    """The JSON answer beside the calls, as compact as without tools: no free whitespace (a model
    cannot spend its budget on blanks), through llguidance's ``x-guidance`` options."""
    schema = json.loads(answer.spec) if answer.kind == "json_schema" else {"type": "object"}
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise bad("response_format: the JSON schema must be an object", "response_format")
    return {**schema, "x-guidance": dict(ANSWER_OPTIONS)}

"""JSON Schema → Lark rules of Gemma 4's call syntax (``Builder``): one rule per distinct subschema.

See ``tools.grammar`` for what is enforced and what is refused.  Three layers: ``SchemaJudge``
(``schema_judge``: what a flattened keyword set generates and accepts), ``SchemaFlattener``
(``schema_flatten``: schema levels into plain keyword sets) and, here, the ``Builder`` that emits
each set as Lark text, with the call-syntax pieces it writes (``Markers``, the string delimiter,
bare keys).  Pure Python, on a worker thread of the gateway (``Pipeline.start``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.request import bad
from gateway.tools.ecma_regex import (
    PATTERN_LENGTH_CAP,
    matches_something,
)
from gateway.tools.schema_algebra import (
    NUMBER_KW,
    TYPES,
    canon,
    empty_interval,
    jkey,
)
from gateway.tools.schema_flatten import SchemaFlattener

QUOTE_TEXT = '<|"|>'

MAX_RULES = 20000  # a grammar larger than this is refused (llguidance compiles it in the decoder)

_NOT_QUOTE = '~/(?s:.*<\\|"\\|>.*)/'  # no string may hold the delimiter's text


@dataclass(frozen=True)
class Markers:
    """Token ids of the markers the grammar names (read from the tokenizer)."""

    call_open: int
    call_close: int
    quote: int
    channel_open: int | None = None
    channel_close: int | None = None

def key_problem(key: str) -> str | None:
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


class Builder(SchemaFlattener):
    def __init__(self, m: Markers) -> None:
        super().__init__()
        self.m = m
        self.rules: list[str] = []
        self._bodies: dict[tuple[str, str], str] = {}
        self._memo: dict[tuple[int, str], str | None] = {}
        self._open: set[str] = set()  # rules whose body is being built (a reference to one is recursion)
        self._recursed: set[str] = set()
        self._n = 0
        self._needs_any = False

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

    # -- one schema -> one rule
    def value(self, s: Any, path: str) -> str | None:
        """The rule of the values ``s`` allows, or None when none does."""
        if s is True or s == {}:
            return self.any_value()
        if s is False:
            return None
        if not isinstance(s, dict):
            raise bad(f"{path} must be a JSON Schema object", path)
        key = (self.tool, canon(s))
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

    # -- emission
    def emit(self, f: dict, path: str) -> str | None:
        if "enum" in f:
            vals, seen = [], set()
            for v in f["enum"]:
                if jkey(v) not in seen and self.accepts(f, v, path):
                    seen.add(jkey(v))
                    vals.append(v)
            return " | ".join(self.literal(v, f"{path}.enum") for v in vals) or None
        types = self.gen_types(f)
        if types is None:
            return self.any_value()
        out = []
        for t in TYPES:
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
            if not matches_something(body):
                return None  # e.g. two patterns that exclude each other
            return f"{self.q()} {self.new(body, prefix='S')} {self.q()}"
        if t in ("integer", "number"):
            sub = {"type": t, **{k: f[k] for k in NUMBER_KW if k in f}}
            if empty_interval(f, t == "integer"):
                return None
            if len(sub) == 1:
                return self.plain_number(t)
            if not matches_something(f"%json {json.dumps(sub)}", rule=True):
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
        items = self._declared_items(f, keys, path)
        if items is None:
            return None
        if len(extras) == 1 and extras[0][1][0] is True and len(extras[0][0]) == 1 and not items and not minp \
                and maxp is None:
            return self.any_object()  # {"type": "object"}: any keys and values
        kinds = []
        for terms, sch, _ in extras:
            ev = self.value(*sch)
            if ev is not None and matches_something(" & ".join(terms)):
                kinds.append(f'{self.new(" & ".join(terms), prefix="K")} ":" {ev}')
        extra_item = (kinds[0] if len(kinds) == 1 else self.new(" | ".join(kinds))) if kinds else None
        if maxp is not None and len([k for k in items if k in required]) > maxp:
            return None
        keyseq = _KeySequence(self, items, required, minp, maxp, extra_item)
        inner = keyseq.tail(0, 0)
        if inner is None:
            if keyseq.distinct:
                p = f"{path}.minProperties"
                raise bad(f"{p}: {minp} properties would need {max(keyseq.distinct)} distinct extra keys, which a "
                          "tool call's grammar cannot keep apart (the same key written twice counts once)", p)
            return None
        return f'"{{" {inner} "}}"' if inner else '"{" "}"'

    def _declared_items(self, f: dict, keys: dict, path: str) -> dict[str, str] | None:
        """Each declared key's ``key: value`` rule, in the template's order (its case-insensitive
        ``dictsort``); None when a required key can have no value."""
        required = f.get("required", {})
        names = list(f.get("propertyNames", []))
        items: dict[str, str] = {}
        for k in sorted(keys, key=lambda x: (x.lower(), x)):
            sch, q = keys[k]
            if names and not all(any(self.accepts(a, k, p) for a in self.expand_apart(x, p)) for x, p in names):
                if k in required:
                    return None
                continue
            problem = key_problem(k)
            if problem:
                param = q if k in f.get("properties", {}) else required.get(k, f"{path}.required")
                raise bad(f"{param}: the property name {k!r} cannot be used in a tool call: {problem}", param)
            r = self.value(sch, q)
            if r is None:
                if k in required:
                    return None
                continue
            items[k] = f"{json.dumps(k + ':', ensure_ascii=False)} {r}"
        return items

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
            problem = key_problem(k)
            if problem:
                raise bad(f"{param}: the key {k!r} of a listed value cannot be written in a tool call: {problem}",
                          param)
            parts.append(f"{json.dumps(k + ':', ensure_ascii=False)} {self.literal(v[k], param)}")
        sep = ' "," '
        return f'"{{" {sep.join(parts)} "}}"' if parts else '"{" "}"'

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


class _KeySequence:
    """An object's keys as rules: the declared ones in order (each optional unless required), then
    extra keys, within ``minProperties`` / ``maxProperties``.  ``tail(i, k)``: the rule for keys
    ``order[i:]`` and the extras when ``k`` keys are written (memoised); None: no way to finish.
    ``distinct`` records a ``minProperties`` that extra keys alone would have to reach (a grammar
    cannot keep two extra keys apart: they could be one key twice)."""

    def __init__(self, b: Builder, items: dict[str, str], required: dict, minp: int, maxp: int | None,
                 extra_item: str | None) -> None:
        self.b, self.items, self.order, self.required = b, items, list(items), required
        self.minp, self.maxp, self.extra_item = minp, maxp, extra_item
        self.cap = (maxp + 1) if maxp is not None else max(minp, 1)
        self.memo: dict[tuple[int, int], str | None] = {}
        self.distinct: list[int] = []

    def tail(self, i: int, k: int) -> str | None:
        if (i, k) not in self.memo:
            self.memo[(i, k)] = self._extras(k) if i == len(self.order) else self._key(i, k)
        return self.memo[(i, k)]

    def _extras(self, k: int) -> str | None:
        lo = max(0, self.minp - k)
        hi = None if self.maxp is None else self.maxp - k
        item = self.extra_item
        more = f'"," {item}'
        if item is None or hi == 0:
            return "" if lo == 0 else None
        if lo > 1:
            self.distinct.append(lo)
            return None
        if k > 0:
            return self.b.new(_repeat(more, lo, hi))
        if lo == 0:
            return self.b.new(f"({' '.join(x for x in (item, _repeat(more, 0, hi and hi - 1)) if x)})?")
        return self.b.new(" ".join(x for x in (item, _repeat(more, lo - 1, hi and hi - 1)) if x))

    def _key(self, i: int, k: int) -> str | None:
        opts = []
        nxt = self.tail(i + 1, min(k + 1, self.cap)) if self.maxp is None or k + 1 <= self.maxp else None
        if nxt is not None:
            opts.append(" ".join(x for x in ('","' if k else "", self.items[self.order[i]], nxt) if x))
        if self.order[i] not in self.required:
            skip = self.tail(i + 1, k)
            if skip is not None:
                opts.append(skip)
        if not opts:
            return None
        if "" in opts:
            rest = [o for o in opts if o]
            return self.b.new(f"({' | '.join(rest)})?") if rest else ""
        return self.b.new(" | ".join(opts))

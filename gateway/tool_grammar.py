"""Forced and strict tool calls as a grammar the decoder enforces token by token.

Why: other Gemma 4 servers only *hint* ``tool_choice: required`` in the prompt (0 of 20 valid
calls measured on mlx-vlm's server).  Here a forced call is a Lark grammar (llguidance's
dialect, compiled and applied in the decoder like any ``response_format``) of Gemma 4's own
call syntax — ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`` — with each
function's JSON Schema turned into that syntax: keys bare and in the order the template
renders them (sorted, as its ``dictsort`` does), strings between ``<|"|>`` tokens (the
delimiter itself cannot appear inside), numbers / booleans / null as JSON (bounded numbers
through llguidance's own ``%json``, whose syntax they share).  So the model writes what it was
trained to write, and the result always parses and validates.

A schema keyword the grammar cannot enforce (``pattern``, ``format``, ``$ref``, ``allOf``, …) is
refused with 400 naming it — never a call that merely looks forced.  Annotations
(``description``, ``title``, ``default``, ``examples``) are accepted.  Pure Python, event loop;
the token ids of the markers come from the checkpoint's tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.chat import bad
from mmserve_core.wire import types as T

ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$schema", "$comment", "$id", "deprecated",
                         "readOnly", "writeOnly", "additionalProperties", "strict"})
NUMERIC = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_SUPPORTED = {
    "string": {"minLength", "maxLength"},
    "integer": NUMERIC,
    "number": NUMERIC,
    "boolean": set(),
    "null": set(),
    "object": {"properties", "required"},
    "array": {"items", "minItems", "maxItems"},
}
_ANY = "type", "enum", "const", "anyOf", "oneOf", "nullable"


@dataclass(frozen=True)
class Markers:
    """Token ids of the markers the grammar names (read from the tokenizer)."""

    call_open: int
    call_close: int
    quote: int
    channel_open: int | None = None
    channel_close: int | None = None


class _Builder:
    def __init__(self, m: Markers) -> None:
        self.m = m
        self.rules: list[str] = []
        self._n = 0
        self._needs_any = False

    def new(self, body: str, prefix: str = "r") -> str:
        self._n += 1
        name = f"{prefix}{self._n}"
        self.rules.append(f"{name}: {body}")
        return name

    def q(self) -> str:
        return f"<[{self.m.quote}]>"

    def literal(self, v: Any, param: str) -> str:
        if isinstance(v, str):
            return f"{self.q()} {json.dumps(v, ensure_ascii=False)} {self.q()}"
        if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
            return json.dumps(json.dumps(v))
        raise bad(f"{param}: enum / const values that are objects or lists cannot be enforced in a tool call",
                  param)

    def value(self, s: Any, param: str) -> str:
        if s is True or s == {}:
            return self.any_value()
        if not isinstance(s, dict):
            raise bad(f"{param} must be a JSON Schema object", param)
        known = ANNOTATIONS | set(_ANY) | set().union(*_SUPPORTED.values())
        unknown = sorted(k for k in s if k not in known)
        if unknown:
            raise bad(f"{param}.{unknown[0]}: this JSON Schema keyword cannot be enforced in a tool call, so "
                      "tool_choice 'required' / a named function / strict cannot use it", f"{param}.{unknown[0]}")
        alts: list[str] = []
        if "const" in s:
            alts = [self.literal(s["const"], f"{param}.const")]
        elif "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise bad(f"{param}.enum must be a non-empty list", f"{param}.enum")
            alts = [self.literal(v, f"{param}.enum[{i}]") for i, v in enumerate(s["enum"])]
        elif "anyOf" in s or "oneOf" in s:
            key = "anyOf" if "anyOf" in s else "oneOf"
            subs = s[key]
            if not isinstance(subs, list) or not subs:
                raise bad(f"{param}.{key} must be a non-empty list", f"{param}.{key}")
            alts = [self.value(x, f"{param}.{key}[{i}]") for i, x in enumerate(subs)]
        else:
            types = s.get("type")
            if types is None:
                if any(k in s for k in ("properties", "required")):
                    types = "object"
                elif "items" in s:
                    types = "array"
                else:
                    return self.any_value()
            for t in types if isinstance(types, list) else [types]:
                if t not in _SUPPORTED:
                    raise bad(f"{param}.type {t!r} is not a JSON Schema type", f"{param}.type")
                alts.append(self.typed(t, s, param))
        if s.get("nullable") is True:
            alts.append('"null"')
        return self.new(" | ".join(alts))

    def typed(self, t: str, s: dict, param: str) -> str:
        for k in set(s) - ANNOTATIONS - set(_ANY):
            if k not in _SUPPORTED[t]:
                raise bad(f"{param}.{k} does not apply to type {t!r} here, so it cannot be enforced", f"{param}.{k}")
        if t == "string":
            lo, hi = _bound(s, "minLength", param, 0), _bound(s, "maxLength", param, None)
            rep = f"{{{lo},{'' if hi is None else hi}}}"
            term = self.new(f'/(?s:.{rep})/ & ~/(?s:.*<\\|"\\|>.*)/', prefix="S")
            return f"{self.q()} {term} {self.q()}"
        if t in ("integer", "number"):
            sub = {"type": t, **{k: s[k] for k in NUMERIC if k in s}}
            return self.new(f"%json {json.dumps(sub)}")
        if t == "boolean":
            return '"true" | "false"'
        if t == "null":
            return '"null"'
        if t == "array":
            item = self.value(s.get("items", True), f"{param}.items")
            lo, hi = _bound(s, "minItems", param, 0), _bound(s, "maxItems", param, None)
            if hi is not None and hi < lo:
                raise bad(f"{param}: maxItems is below minItems", param)
            if hi == 0:
                return '"[" "]"'
            more = "" if hi == 1 else f' ("," {item}){{{max(lo - 1, 0)},{"" if hi is None else hi - 1}}}'
            body = f'"[" {item}{more} "]"'
            return body if lo > 0 else f'"[" "]" | {body}'
        return self.obj(s, param)

    def obj(self, s: dict, param: str) -> str:
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            raise bad(f"{param}.properties must be an object", f"{param}.properties")
        required = s.get("required") or []
        if not isinstance(required, list) or any(r not in props for r in required):
            raise bad(f"{param}.required must list properties that {param}.properties declares", f"{param}.required")
        if not props:
            return '"{" "}"' if s.get("additionalProperties") is False else self.any_object()
        keys = sorted(props)  # the template's dictsort: the order the model sees them in
        items = [f"{json.dumps(k + ':')} {self.value(props[k], f'{param}.properties.{k}')}" for k in keys]
        # tail(i, comma): the items from i on, with a comma before the first one if comma
        nxt = {(len(keys), c): "" for c in (0, 1)}
        for i in range(len(keys) - 1, -1, -1):
            for c in (0, 1):
                take = " ".join(x for x in ('","' if c else "", items[i], nxt[(i + 1, 1)]) if x)
                if keys[i] in required:
                    body = take
                else:  # optional: this item, or the rest as if it were not there
                    body = f"{take} | {nxt[(i + 1, c)]}" if nxt[(i + 1, c)] else f"({take})?"
                nxt[(i, c)] = self.new(body)
        return f'"{{" {nxt[(0, 0)]} "}}"'

    def any_value(self) -> str:
        """A value of any type (a schema with no constraint), in Gemma 4's syntax."""
        if not self._needs_any:
            self._needs_any = True
            q = self.q()
            self.rules += [
                f'gany: {q} GSTR {q} | %json {{"type": "number"}} | "true" | "false" | "null" | gobj | glist',
                'GSTR: /(?s:.*)/ & ~/(?s:.*<\\|"\\|>.*)/',
                'gobj: "{" "}" | "{" GKEY ":" gany ("," GKEY ":" gany)* "}"',
                "GKEY: /[A-Za-z_][A-Za-z0-9_]*/",
                'glist: "[" "]" | "[" gany ("," gany)* "]"',
            ]
        return "gany"

    def any_object(self) -> str:
        self.any_value()
        return "gobj"


def _bound(s: dict, key: str, param: str, default: int | None) -> int | None:
    v = s.get(key, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise bad(f"{param}.{key} must be a non-negative integer", f"{param}.{key}")
    return v


def tool_call_grammar(tools: list[T.Tool], markers: Markers, *, choice: str, name: str | None = None,
                      parallel: bool = True, thinking: bool = False, answer: T.Constraint | None = None,
                      schema_path: str = "tools[{i}].function.parameters") -> str:
    """The Lark grammar of a response under ``choice``:

    * ``required`` — one call (or several, with ``parallel``) of any declared tool, nothing else;
    * ``function`` — a call of ``name``;
    * ``auto`` (strict tools) — answer text, or calls; with ``answer`` (a JSON ``response_format``)
      the answer is that JSON instead of free text.

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
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad(f"{where} must be a JSON Schema of type object", where)
        alts.append(f"{json.dumps('call:' + t.name)} {b.value(params, where)}")
    call = b.new(f"<[{markers.call_open}]> ({' | '.join(alts)}) <[{markers.call_close}]>", prefix="call")
    calls = f"{call}+" if parallel else call
    if choice == "auto":
        if answer is not None:
            schema = json.loads(answer.spec) if answer.kind == "json_schema" else {"type": "object"}
            body = f"%json {json.dumps(schema)} | {calls}"
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

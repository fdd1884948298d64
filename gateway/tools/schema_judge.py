"""What a flattened keyword set generates and accepts — exact answers the grammar builder asks.

Why: a JSON Schema keyword set (the plain dict ``SchemaFlattener.own`` makes of one schema level)
is turned into a grammar only after two questions are settled: which values the grammar would
write for it (``gen_types``, ``plan``, ``generates``) and which values it accepts, exactly
(``accepts``: listed ``enum``/``const`` values are kept only when valid; ``excludes``/``disjoint``:
``oneOf`` is exact only where its branches provably share no value).  ``SchemaJudge`` holds those
answers; it reads subschemas through ``expand_apart``, which the flattener below it provides.
Pure Python, on whichever thread builds the grammar (a worker thread of the gateway)."""

from __future__ import annotations

import abc
import re
from fractions import Fraction
from typing import Any

from gateway.errors import HTTPError
from gateway.tools.ecma_regex import (
    literal_regex,
    py_pattern,
)
from gateway.tools.schema_algebra import (
    ARRAY_KW,
    NUMBER_KW,
    OBJECT_KW,
    STRING_KW,
    all_of,
    jkey,
    json_type,
    overlap,
    type_ok,
)

# Keys generated as extra keys (additionalProperties / patternProperties): printable ASCII without
# blanks and without what the call syntax or this grammar's regexes treat specially (" , : < [ \\ ]
# { | }); on ASCII, ECMA's and Python's regexes agree, so a key pattern means the same to both.
_EXTRA_KEY = "[\\x21\\x23-\\x2B\\x2D-\\x39\\x3B\\x3D-\\x5A\\x5E-\\x7A\\x7E]+"

_EXTRA_KEY_RE = re.compile(_EXTRA_KEY)


class SchemaJudge(abc.ABC):
    """The generate/accept questions over flattened keyword sets (see the module docstring)."""

    def __init__(self) -> None:
        self._enums: dict[int, tuple[list, set[str]]] = {}

    @abc.abstractmethod
    def expand_apart(self, s: object, path: str) -> list[dict]:
        """``s`` as its flattened alternatives (``SchemaFlattener`` flattens; the judge only asks)."""

    # -- what a keyword set generates
    def gen_types(self, f: dict) -> set | None:
        """The JSON types the grammar writes for ``f`` (None: any value)."""
        if "enum" in f:
            return {json_type(v) for v in f["enum"]}
        t = f.get("type")
        if t is None:
            t = set()
            if any(k in f for k in OBJECT_KW - {"_closed"}):
                t.add("object")
            if any(k in f for k in ARRAY_KW):
                t.add("array")
            if any(k in f for k in STRING_KW):
                t.add("string")
            if any(k in f for k in NUMBER_KW):
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
            sch, q = all_of(parts) if parts else (True, f"{path}.required")
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
        base = [f"/{_EXTRA_KEY}/"] + ([f"~/({'|'.join(map(literal_regex, banned))})/"] if banned else [])
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

    # -- what a keyword set accepts (exact, for listed values and exclusivity)
    def accepts(self, f: dict, v: Any, path: str) -> bool:
        t = json_type(v)
        if "enum" in f and jkey(v) not in self.enum_keys(f["enum"]):
            return False
        if not type_ok(t, f.get("type")):
            return False
        if t == "string":
            if len(v) < f.get("minLength", 0) or ("maxLength" in f and len(v) > f["maxLength"]):
                return False
            return all(py_pattern(p, q).search(v) for p, _, q in f.get("_patterns", []))
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
            if f.get("uniqueItems") and len({jkey(x) for x in v}) < len(v):
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
            hit = self._enums[id(values)] = (values, {jkey(x) for x in values})
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
            if ga is not None and tb is not None and not overlap(ga, tb):
                return True
            if "enum" in b and ga is not None and not any(type_ok(json_type(v), ga) for v in b["enum"]):
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

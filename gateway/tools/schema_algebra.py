"""JSON Schema keyword algebra for the tool-call grammar: types met, bounds intersected, ``allOf``
merged exactly (or ``NoMerge`` / ``Unsat``), local ``$ref`` anchors and drafts.

Why apart: the builder (``tools.schema_grammar``) expands a schema level into plain keyword sets
with these; they know nothing of grammars.  Pure Python, on the thread that builds the grammar."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")

OBJECT_KW = {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
              "maxProperties", "propertyNames", "_closed"}

ARRAY_KW = {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}

STRING_KW = {"minLength", "maxLength", "_patterns"}

NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}

LOWER = {"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"}

UPPER = {"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"}

COUNTS = {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}

# validation keywords no exact grammar is built for (annotations and unknown keywords are ignored)
REFUSED = {"contains", "minContains", "maxContains", "unevaluatedItems", "$recursiveRef", "$dynamicRef"}

VALIDATION = ((OBJECT_KW | ARRAY_KW | NUMBER_KW | REFUSED) - {"_closed"}) | {
    "type", "enum", "const", "pattern", "minLength", "maxLength", "additionalItems", "unevaluatedProperties",
    "$ref", "allOf", "anyOf", "oneOf", "not", "if", "dependencies", "dependentRequired", "dependentSchemas"}

# Drafts whose validators know a keyword (others ignore it): what the grammar enforces must hold in
# every reading the schema's "$schema" allows (``schema_drafts``), and what an exclusivity proof relies on
# must be a constraint in all of them.
KNOWN_IN = {"const": {7, 2019, 2020}, "propertyNames": {7, 2019, 2020}, "dependencies": {4, 7},
             "dependentRequired": {2019, 2020}, "dependentSchemas": {2019, 2020}, "prefixItems": {2020},
             "unevaluatedProperties": {2019, 2020}, "if": {7, 2019, 2020}}

HUGE = 2 ** 31 - 1  # a count beyond any reply (and beyond llguidance's repetition bounds)

def canon(x: Any) -> str:
    if isinstance(x, dict):
        x = {k: v for k, v in x.items() if k != "_paths"}
    return json.dumps(x, sort_keys=True, ensure_ascii=False, default=str)

def jkey(v: Any) -> str:
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

def json_type(v: Any) -> str:
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

def type_ok(t: str, types) -> bool:
    return types is None or t in types or (t == "integer" and "number" in types)

def meet_types(a, b):
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

def overlap(gen: set, declared: set) -> bool:
    nums = {"number", "integer"}
    return bool(gen & declared) or bool(gen & nums and declared & nums)

def all_of(parts: list[tuple[Any, str]]) -> tuple[Any, str]:
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
        c = canon(s)
        if c not in seen:
            seen.add(c)
            uniq.append((c, s, p))
    uniq.sort(key=lambda x: x[0])
    if not uniq:
        return True, parts[0][1] if parts else ""
    if len(uniq) == 1:
        return uniq[0][1], uniq[0][2]
    return {"allOf": [s for _, s, _ in uniq], "_paths": [p for _, _, p in uniq]}, uniq[0][2]

class NoMerge(Exception):
    """Two keyword sets whose conjunction has no exact plain form."""

class Unsat(Exception):
    """No value satisfies the keyword set."""

def schema_drafts(root: Any) -> set[int]:
    """The JSON Schema drafts a validator may read ``root`` by: the one its ``$schema`` names, else
    draft 7 and 2020-12 (the usual defaults)."""
    uri = root.get("$schema") if isinstance(root, dict) else None
    if isinstance(uri, str):
        for names, draft in ((("draft-03", "draft-04"), 4), (("draft-06", "draft-07"), 7), (("2019-09",), 2019),
                             (("2020-12",), 2020)):
            if any(n in uri for n in names):
                return {draft}
    return {7, 2020}

def find_anchor(node: Any, name: str, path: str) -> tuple[Any, str] | None:
    """The subschema whose ``$anchor`` is ``name`` or whose ``$id`` / ``id`` is ``#name``."""
    if isinstance(node, dict):
        if node.get("$anchor") == name or f"#{name}" in (node.get("$id"), node.get("id")):
            return node, path
        for k, v in node.items():
            if k not in ("enum", "const", "default", "examples"):
                hit = find_anchor(v, name, f"{path}.{k}")
                if hit is not None:
                    return hit
    elif isinstance(node, list):
        for j, v in enumerate(node):
            hit = find_anchor(v, name, f"{path}[{j}]")
            if hit is not None:
                return hit
    return None

def as_fraction(x) -> Fraction:
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)

def empty_interval(f: dict, integer: bool) -> bool:
    """No number (integer) lies within ``f``'s bounds."""
    lows = [(as_fraction(f[k]), k == "exclusiveMinimum") for k in ("minimum", "exclusiveMinimum") if k in f]
    highs = [(as_fraction(f[k]), k == "exclusiveMaximum") for k in ("maximum", "exclusiveMaximum") if k in f]
    if not lows or not highs:
        return False
    lo, lo_x = max(lows, key=lambda x: (x[0], x[1]))
    hi, hi_x = min(highs, key=lambda x: (x[0], not x[1]))
    if integer:  # the least and the greatest integer within
        return (math.floor(lo) + 1 if lo_x else math.ceil(lo)) > (math.ceil(hi) - 1 if hi_x else math.floor(hi))
    return lo > hi or (lo == hi and (lo_x or hi_x))

def merge_schemas(a: dict, b: dict) -> dict:
    """The conjunction of two plain keyword sets (``Unsat`` if nothing satisfies both, ``NoMerge``
    where the conjunction has no exact plain form)."""
    out = dict(a)
    out["_src"] = {**a.get("_src", {}), **b.get("_src", {})}
    if a.get("_inexact") or b.get("_inexact"):
        out["_inexact"] = True
    for k, v in b.items():
        if k in ("_src", "_inexact"):
            continue
        out[k] = _meet_keyword(k, a[k], v, a, b) if k in a else v
    if "properties" in b and "properties" not in a or "properties" in a and "properties" not in b:
        out["properties"] = merge_props(a, b)
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
        if lo in out and hi in out and out[lo] > out[hi]:
            types = out.get("type")
            owner = {"minLength": "string", "minItems": "array", "minProperties": "object"}[lo]
            if types is not None and types <= {owner}:
                raise Unsat()
    if "enum" in out and not out["enum"]:
        raise Unsat()
    return out


def _meet_keyword(k: str, w: Any, v: Any, a: dict, b: dict) -> Any:
    """Keyword ``k`` of both sets (``w`` from ``a``, ``v`` from ``b``) as one value."""
    if k == "type":
        met = meet_types(w, v)
        if not met:
            raise Unsat()
        return met
    if k == "enum":
        keys = {jkey(x) for x in v}
        return [x for x in w if jkey(x) in keys]
    if k in LOWER or k in UPPER:
        return max(w, v) if k in LOWER else min(w, v)
    if k == "multipleOf":
        return _common_multiple(w, v)
    if k in ("_patterns", "propertyNames"):
        return w + [x for x in v if x not in w]
    if k in ("uniqueItems", "_closed"):
        return True
    if k in ("items", "additionalProperties"):
        return all_of([w, v])
    if k == "prefixItems":
        rest_a, rest_b = a.get("items", (True, "")), b.get("items", (True, ""))
        return [all_of([w[j] if j < len(w) else rest_a, v[j] if j < len(v) else rest_b])
                for j in range(max(len(w), len(v)))]
    if k == "required":
        return {**w, **v}
    if k == "properties":
        return merge_props(a, b)
    if k == "patternProperties":
        merged = dict(w)
        for pat, (x, q, rx) in v.items():
            merged[pat] = (*all_of([merged[pat][:2], (x, q)]), rx) if pat in merged else (x, q, rx)
        return merged
    if w != v:
        raise NoMerge(f"{k} {w!r} and {k} {v!r}")
    return w


def _common_multiple(w: float, v: float) -> int | float:
    """Multiples of both: multiples of their least common multiple (of fractions, exact)."""
    fw = Fraction(str(w)) if isinstance(w, float) else Fraction(w)
    fv = Fraction(str(v)) if isinstance(v, float) else Fraction(v)
    m = Fraction(math.lcm(fw.numerator, fv.numerator), math.gcd(fw.denominator, fv.denominator))
    if float(m) != m:
        raise NoMerge(f"multipleOf {w} and multipleOf {v}")
    return int(m) if m.denominator == 1 else float(m)

def merge_props(a: dict, b: dict) -> dict:
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
        out[k] = all_of(parts)
    return out

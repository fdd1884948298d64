"""JSON Schema → Lark rules of Gemma 4's call syntax (``Builder``): one rule per distinct subschema.

See ``tools.grammar`` for what is enforced and what is refused; this module holds the builder
and the call-syntax pieces it writes (``Markers``, the string delimiter, bare keys).  Pure Python,
the gateway's event loop."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from gateway.errors import HTTPError
from gateway.request import bad
from gateway.tools.ecma_regex import (
    PATTERN_LENGTH_CAP,
    literal_regex,
    matches_something,
    py_pattern,
    search_regex,
)
from gateway.tools.schema_algebra import (
    ARRAY_KW,
    COUNTS,
    HUGE,
    KNOWN_IN,
    NUMBER_KW,
    OBJECT_KW,
    REFUSED,
    STRING_KW,
    TYPES,
    UPPER,
    VALIDATION,
    NoMerge,
    Unsat,
    all_of,
    canon,
    empty_interval,
    find_anchor,
    jkey,
    json_type,
    merge_schemas,
    overlap,
    schema_drafts,
    type_ok,
)

QUOTE_TEXT = '<|"|>'

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

_APPLICATORS = {"$ref", "allOf", "anyOf", "oneOf", "not", "if", "dependencies", "dependentRequired",
                "dependentSchemas"}
_OBJECT_OWN = {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "unevaluatedProperties"}


class Builder:
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
        self.drafts = schema_drafts(root)

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

    # -- flattening one level
    def own(self, s: dict, path: str) -> tuple[dict, list[tuple[str, Any]]]:
        """``s``'s own keywords as a plain keyword set, and its in-place applicators (in order)."""
        f: dict[str, Any] = {"_src": {}}
        comb: list[tuple[str, Any]] = []
        for k, v in s.items():
            p = f"{path}.{k}"
            if k in _APPLICATORS:
                if k in ("allOf", "anyOf", "oneOf") and (not isinstance(v, list) or not v):
                    raise bad(f"{p} must be a non-empty list", p)
                comb.append((k, v))
            elif k in ("items", "prefixItems", "uniqueItems"):
                self._array_keyword(f, s, k, v, p, path)
            elif k in _OBJECT_OWN:
                self._object_keyword(f, k, v, p)
            elif k in REFUSED:
                if k == "unevaluatedItems" and v in (True, {}):
                    continue
                raise bad(f"{p}: the JSON Schema keyword {k!r} cannot be enforced in a tool call, so "
                          "tool_choice 'required' / a named function / strict cannot use it", p)
            else:
                self._value_keyword(f, s, k, v, p)
            # anything else is an annotation (description, format, examples, …) or unknown: ignored
        self._settle(f, s, path)
        return f, comb

    def _value_keyword(self, f: dict, s: dict, k: str, v: Any, p: str) -> None:
        """``type``, ``enum`` / ``const``, counts, numeric bounds and ``pattern``."""
        if k == "type":
            ts = v if isinstance(v, list) else [v]
            if not ts or any(t not in TYPES for t in ts):
                raise bad(f"{p}: {v!r} is not a JSON Schema type", p)
            f["type"] = set(ts)
        elif k in ("enum", "const"):
            vals = [v] if k == "const" else v
            if not isinstance(vals, list):
                raise bad(f"{p} must be a list", p)
            if "enum" in f:
                keys = {jkey(x) for x in vals}
                vals = [x for x in f["enum"] if jkey(x) in keys]
            f["enum"] = list(vals)
        elif k in COUNTS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
                raise bad(f"{p} must be a non-negative integer", p)
            if k in UPPER and v > HUGE:
                return  # no reply can be that long: no bound
            if v > HUGE:
                raise bad(f"{p}: {v} is more than any reply can hold", p)
            f[k] = int(v)
        elif k in ("minimum", "maximum", "multipleOf"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (k == "multipleOf" and v <= 0):
                raise bad(f"{p} must be a {'positive ' if k == 'multipleOf' else ''}number", p)
            f[k] = v
        elif k in ("exclusiveMinimum", "exclusiveMaximum"):
            self._exclusive(f, s, k, v, p)
        elif k == "pattern":
            if not isinstance(v, str):
                raise bad(f"{p} must be a string", p)
            f["_patterns"] = [(v, self.regex(v, p), p)]

    def _exclusive(self, f: dict, s: dict, k: str, v: Any, p: str) -> None:
        """Draft 4 reads ``exclusiveMinimum`` as a flag on ``minimum`` (any true value), later drafts
        as a bound of its own (a boolean as 0 / 1): the grammar keeps what every reading keeps."""
        if not isinstance(v, (int, float)):
            raise bad(f"{p} must be a number", p)
        base = "minimum" if k == "exclusiveMinimum" else "maximum"
        if 4 in self.drafts and v and isinstance(s.get(base), (int, float)) and not isinstance(s.get(base), bool):
            f["_x" + base] = True
        if self.drafts - {4}:
            f["_b" + k] = int(v) if isinstance(v, bool) else v
        if (4 in self.drafts and not isinstance(v, bool)) or (self.drafts - {4} and isinstance(v, bool)):
            f["_inexact"] = True  # the readings differ: no exclusivity proof rests on it

    def _array_keyword(self, f: dict, s: dict, k: str, v: Any, p: str, path: str) -> None:
        if k == "items":
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
        elif v is True:  # uniqueItems
            f["uniqueItems"] = True
            f["_src"][k] = p

    def _object_keyword(self, f: dict, k: str, v: Any, p: str) -> None:
        if k in ("properties", "patternProperties") and not isinstance(v, dict):
            raise bad(f"{p} must be an object", p)
        if k == "properties":
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
            if v:
                f[k] = {pat: (x, f"{p}.{pat}", py_pattern(pat, f"{p}.{pat}")) for pat, x in v.items()}
        elif k == "propertyNames":
            if v is not True and v != {}:
                f[k] = [(v, p)]
        elif v is False:  # unevaluatedProperties
            f["_closed"] = True
        elif v is not True and v != {}:
            raise bad(f"{p}: an unevaluatedProperties schema cannot be enforced in a tool call", p)

    def _settle(self, f: dict, s: dict, path: str) -> None:
        """What needs the whole keyword set: prefix items under both readings of ``items``, the
        exclusive bounds every draft keeps, keywords some draft does not know."""
        if "prefixItems" in s and isinstance(s.get("items"), (dict, bool)) and "prefixItems" in f:
            # 2020-12 reads items as the rest after prefixItems, draft 7 (which has no prefixItems) as
            # every item: a prefix item meets both, so either reading validates
            f["prefixItems"] = [all_of([x, (s["items"], f"{path}.items")]) for x in f["prefixItems"]]
        for b, x in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            bounds = [f.pop("_b" + x)] if "_b" + x in f else []
            if f.pop("_x" + b, False) and b in f:
                bounds.append(f.pop(b))  # draft 4's exclusive minimum / maximum
            if bounds:
                f[x] = max(bounds) if x == "exclusiveMinimum" else min(bounds)
        for k in KNOWN_IN:
            if k in s and not self.drafts <= KNOWN_IN[k]:
                f["_inexact"] = True  # a validator of another draft ignores it: enforced, never relied on

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
                if self.drafts & {4, 7} and any(x in VALIDATION and x != "$ref" for x in s):
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
                    out.append(merge_schemas(a, b))
                except Unsat:
                    continue
                except NoMerge as e:
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
            found = find_anchor(self.root, r[1:], self.root_path)
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
        keys = {k for k in v if k in VALIDATION}
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
            rest = set(TYPES) - ts - ({"integer"} if "number" in ts else set())
            return self.cross(alts, [{"_src": {}, "type": rest}], param)
        if keys and keys <= {"enum", "const"}:
            banned = {jkey(x) for x in (v.get("enum") or [])} | ({jkey(v["const"])} if "const" in v else set())
            out = []
            for a in alts:
                if "enum" not in a:
                    raise bad(f"{param}: 'not' an enum cannot be enforced in a tool call unless the values are "
                              "listed", param)
                b = dict(a, enum=[x for x in a["enum"] if jkey(x) not in banned])
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

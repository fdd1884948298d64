"""JSON Schema levels flattened into plain keyword sets, the form the grammar builder emits from.

Why: real-world schemas say one thing many ways — ``$ref`` to ``definitions``/``$defs``, ``allOf``
pieces, ``anyOf``/``oneOf`` with sibling keywords, ``not``, ``dependencies``, several types with
per-type keywords.  ``SchemaFlattener`` turns each level into a list of alternatives, each one plain
keyword set (own keywords merged, references inlined, applicators multiplied out), refusing by name
what cannot be enforced in a tool call; ``SchemaJudge`` (below it) answers what a set generates and
accepts.  Pure Python, on whichever thread builds the grammar (a worker thread of the gateway)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from gateway.request import bad
from gateway.tools.ecma_regex import (
    py_pattern,
    search_regex,
)
from gateway.tools.schema_algebra import (
    COUNTS,
    HUGE,
    KNOWN_IN,
    REFUSED,
    TYPES,
    UPPER,
    VALIDATION,
    NoMerge,
    Unsat,
    all_of,
    find_anchor,
    jkey,
    merge_schemas,
    schema_drafts,
)
from gateway.tools.schema_judge import SchemaJudge

MAX_ALTERNATIVES = 64  # branches one schema level may multiply out to (anyOf x oneOf x dependencies …)

_APPLICATORS = {"$ref", "allOf", "anyOf", "oneOf", "not", "if", "dependencies", "dependentRequired",
                "dependentSchemas"}
_OBJECT_OWN = {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "unevaluatedProperties"}


class SchemaFlattener(SchemaJudge):
    """JSON Schema levels -> plain keyword sets: own keywords merged, ``$ref`` inlined, ``anyOf`` /
    ``oneOf`` / ``allOf`` / ``not`` / ``dependencies`` multiplied out into alternatives.  The state is
    per grammar: the tool being read (its root for ``$ref``, its drafts) and the caches."""

    def __init__(self) -> None:
        super().__init__()
        self._regex: dict[str, str | ValueError] = {}
        self.tool, self.root, self.root_path = 0, {}, ""
        self.drafts = {7, 2020}
        self._inlining: list[str] = []  # $ref targets being merged in at the current level

    def begin_tool(self, i: int, root: Any, path: str) -> None:
        self.tool, self.root, self.root_path = i, root, path
        self.drafts = schema_drafts(root)


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

"""The tool-call grammar's productivity pass: rules that can derive no finite text are dropped.

Why: a required property whose schema refers back to itself can never be finished; left in,
the model could enter a value it can never close.  ``prune`` removes such rules (an optional
property is left out; a tool with no finite object is refused by the caller).  Pure Python."""

from __future__ import annotations

import json
import re

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

def prune(rules: list[str]) -> tuple[list[str], set[str]]:
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

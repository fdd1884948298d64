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

How a schema becomes a grammar (``schema_grammar.Builder``):

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
it (a value both readings accept).  Pure Python, on a worker thread of the gateway (a build takes 0.4 ms at the median,
6.5 ms at p99 and up to 121 ms on JSONSchemaBench: ``Pipeline.start`` keeps it off the event loop); the token ids of the markers come from the checkpoint's tokenizer.
"""

from __future__ import annotations

import json

from gateway.request import bad
from gateway.tools.grammar_prune import prune
from gateway.tools.schema_grammar import Builder, Markers
from mmserve_core.wire import types as T


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
    b = Builder(markers)
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
    rules, live = prune(b.rules)
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

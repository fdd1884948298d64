"""Random walks through llguidance's token mask: what a random-weight model writes under a grammar,
without the model (``tests/rpc/test_schema_corpus.py``; ``python -m tests.tooling.schema_walk`` over
the whole corpus).

A walk starts a fresh ``LLMatcher`` on the grammar and, step by step, picks a random allowed token —
biased toward ending (an allowed stop token, a closing token) so that it terminates — until the
matcher accepts the end or the step bound is hit.  The text is then read back as the server would:
a tool call's body through ``gateway.tools.parser.parse_call``, a ``response_format`` reply through
``json.loads``; and validated with ``jsonschema`` against the schema (``format`` not checked: an
annotation).  Model-free, CPU only; the tokenizer is the tiny checkpoint's (byte-level, 512 ids).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EOS = [1, 106, 50]
CALL_OPEN, CALL_CLOSE, QUOTE = 48, 49, 52
# Tokens a walk prefers where allowed (ends rather than grows): the stop ids, the call's close, the
# string delimiter, and the bytes that close or separate JSON / call syntax.
_CLOSERS = [*EOS, CALL_CLOSE, QUOTE] + [256 + ord(c) for c in '}]",']


@dataclass
class Tally:
    walks: int = 0
    valid: int = 0
    bounded: int = 0  # hit the step bound before the grammar let it end (not a failure)
    gave_up: list = field(default_factory=list)  # (id, llguidance's error): it failed mid-way (an engine limit)
    unjudged: list = field(default_factory=list)  # (id, why): jsonschema itself fails on the schema
    invalid: list = field(default_factory=list)  # (id, text, why)

    def add(self, other: Tally) -> None:
        self.walks += other.walks
        self.valid += other.valid
        self.bounded += other.bounded
        self.invalid += other.invalid
        self.gave_up += other.gave_up
        self.unjudged += other.unjudged


class Walker:
    def __init__(self, tokenizer_dir: Path | None = None) -> None:
        import llguidance.hf

        from tests.tooling.bench_schema_coverage import tiny_tokenizer

        self._tmp = None
        if tokenizer_dir is None:
            self._tmp = tempfile.TemporaryDirectory()
            tokenizer_dir = Path(self._tmp.name) / "tok"
        self.hf = tiny_tokenizer(tokenizer_dir)
        self.tok = llguidance.hf.from_tokenizer(self.hf, n_vocab=512, eos_token=EOS)

    def walk(self, grammar: str, rng: np.random.Generator, steps: int = 300, stop_bias: float = 0.6,
             prefix: list[int] | None = None) -> tuple[list[int], str]:
        """-> (token ids, how it ended): ``end`` (the grammar let it stop), ``bound`` (the step bound),
        ``error`` (llguidance gave up mid-way, e.g. a lexer too complex: its error is ``self.error``)."""
        from llguidance import LLMatcher

        m = LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        ids: list[int] = []
        for t in prefix or []:
            assert m.consume_token(t), m.get_error()
            ids.append(t)
        self.error = ""
        for _ in range(steps):
            mask = np.frombuffer(m.compute_bitmask(), dtype=np.uint32)
            if m.is_error():
                self.error = m.get_error()
                return ids, "error"
            bits = ((mask[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(-1)[:512]
            allowed = np.nonzero(bits)[0]
            assert allowed.size, "the mask emptied"
            if m.is_accepting() and any(e in allowed for e in EOS) and rng.random() < stop_bias:
                return ids, "end"
            pref = [t for t in _CLOSERS if bits[t] and t not in EOS]
            t = int(rng.choice(pref)) if pref and rng.random() < stop_bias * 0.5 else int(rng.choice(allowed))
            if t in EOS:
                assert m.is_accepting(), "a stop token allowed before the grammar accepts"
                return ids, "end"
            if not m.consume_token(t) or m.is_error():
                self.error = m.get_error()
                return ids, "error"
            ids.append(t)
            if m.is_stopped():
                return ids, "end"
        return ids, "bound"

    def text(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _first_error_line(error: str) -> str:
    return next((x for x in error.splitlines() if x.startswith("Error:")), error[:200])


def _errors(v, doc) -> list | None:
    """The validation errors (None: the validator itself fails on this schema, e.g. a draft-4 ``id``
    that is not a string)."""
    import warnings

    import jsonschema

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sorted(v.iter_errors(doc), key=lambda e: list(e.path))
    except (jsonschema.exceptions.SchemaError, AttributeError, TypeError, LookupError):
        return None
    except Exception as e:  # noqa: BLE001 - e.g. an unresolvable $ref (its class moved across versions)
        if "Unresolvable" in type(e).__name__ or "Referencing" in type(e).__module__:
            return None
        raise


class _Readings:
    """Validates against several drafts' readings at once (an error in any is an error)."""

    def __init__(self, validators: list) -> None:
        self.validators = validators

    def iter_errors(self, doc):
        for v in self.validators:
            yield from v.iter_errors(doc)


def validator(schema):
    """``jsonschema``'s validator for the draft the schema's ``$schema`` names — for a schema naming
    none, draft 7's and 2020-12's both (clients default to either) — with ``multipleOf`` checked
    exactly (as fractions of the decimal texts): its float check calls 8.19 no multiple of 0.01
    (8.19 / 0.01 is 818.9999999999999 in binary floating point)."""
    import jsonschema

    named = isinstance(schema, dict) and "$schema" in schema
    classes = [jsonschema.validators.validator_for(schema)] if named else \
        [jsonschema.Draft7Validator, jsonschema.Draft202012Validator]
    return _Readings([jsonschema.validators.extend(c, {"multipleOf": _multiple_of})(schema) for c in classes])


def _multiple_of(validator, m, instance, schema):
    from fractions import Fraction

    import jsonschema

    if not validator.is_type(instance, "number") or isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0:
        return
    if Fraction(repr(instance)) % Fraction(repr(m)) != 0:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {m}")


def tool_grammar_of(schema, parallel: bool = False) -> str:
    """The decoder's grammar for a forced call of one tool taking ``schema`` (HTTPError if refused)."""
    from llguidance import LLMatcher

    from gateway.tools.grammar import Markers, tool_call_grammar
    from mmserve_core.wire.types import Tool

    mk = Markers(call_open=CALL_OPEN, call_close=CALL_CLOSE, quote=QUOTE, channel_open=100, channel_close=101)
    return LLMatcher.grammar_from_lark(tool_call_grammar([Tool("f", "", schema)], mk, choice="required",
                                                         parallel=parallel))


class _Unjudged(Exception):
    """The validator itself fails on this schema: the walk is counted, not judged."""


def _judged(v, doc) -> None:
    errors = _errors(v, doc)
    if errors is None:
        raise _Unjudged
    assert not errors, errors[0].message[:200]


def _check_walks(w: Walker, sid: str, schema, grammar: str, rng, n: int, steps: int, judge) -> Tally:
    """``n`` random walks over ``grammar``; each finished walk's text goes to ``judge(text, validator)``,
    which raises when the text is wrong (``_Unjudged``: the validator cannot judge this schema)."""
    out = Tally()
    v = validator(schema)
    for _ in range(n):
        ids, how = w.walk(grammar, rng, steps)
        out.walks += 1
        if how == "bound":
            out.bounded += 1
            continue
        if how == "error":
            out.gave_up.append((sid, _first_error_line(w.error)))
            continue
        text = w.text(ids)
        try:
            judge(text, v)
            out.valid += 1
        except _Unjudged:
            out.unjudged.append((sid, "jsonschema fails on this schema"))
        except Exception as e:  # noqa: BLE001 - collected and reported
            out.invalid.append((sid, text[:300], repr(e)[:300]))
    return out


def _judge_call(text: str, v) -> None:
    from gateway.tools.parser import CLOSE, OPEN, ToolCallParser, parse_call

    assert text.startswith(OPEN) and text.endswith(CLOSE), "not one call"
    call = parse_call(text[len(OPEN):-len(CLOSE)])
    args = json.loads(call.arguments)
    _judged(v, args)
    p = ToolCallParser()  # the streamed arguments are the same JSON
    p.feed(text)
    p.finish()
    assert p.malformed == 0 and json.loads(p.calls[0].arguments) == args, "streamed differ"


def check_tool_walk(w: Walker, sid: str, schema, grammar: str, rng, n: int, steps: int) -> Tally:
    """Walks over a tool-call grammar: one call, its arguments valid, the streamed parse the same."""
    return _check_walks(w, sid, schema, grammar, rng, n, steps, _judge_call)


def check_json_walk(w: Walker, sid: str, schema, grammar: str, rng, n: int, steps: int) -> Tally:
    """Walks over a structured-output grammar: the text is JSON valid against the schema."""
    return _check_walks(w, sid, schema, grammar, rng, n, steps, lambda text, v: _judged(v, json.loads(text)))


def main(argv: list[str] | None = None) -> int:
    from decoder_service.constraints import ConstraintCompiler
    from gateway.errors import HTTPError
    from mmserve_core.wire.errors import InvalidArgument
    from mmserve_core.wire.types import Constraint
    from tests.tooling.bench_schema_coverage import CATEGORIES, is_object_schema, load_category

    ap = argparse.ArgumentParser(description="random walks over the whole corpus (slow: minutes)")
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=1, help="every Nth schema")
    ap.add_argument("--category", action="append")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w = Walker()
    compiler = ConstraintCompiler(w.hf, 512, EOS)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for cat in args.category or CATEGORIES:
        tools, jsons = Tally(), Tally()
        for sid, schema in load_category(cat)[:: args.every]:
            if is_object_schema(schema):
                try:
                    g = tool_grammar_of(schema)
                except HTTPError:
                    g = None
                if g is not None:
                    tools.add(check_tool_walk(w, sid, schema, g, rng, args.walks, args.steps))
            try:
                g = compiler.compile(Constraint("json_schema", json.dumps(schema))).grammar
            except InvalidArgument:
                g = None
            if g is not None:
                jsons.add(check_json_walk(w, sid, schema, g, rng, args.walks, args.steps))
        for what, t in (("tool", tools), ("json", jsons)):
            print(f"{cat:15s} {what}: {t.walks} walks, {t.valid} valid, {len(t.invalid)} invalid, "
                  f"{t.bounded} hit the step bound, {len(t.gave_up)} stopped by an llguidance error, "
                  f"{len(t.unjudged)} the validator cannot judge")
            for sid, why in t.gave_up[:4]:
                print(f"    gave up: {sid}: {why}")
            for sid, text, why in t.invalid[:8]:
                print(f"    {sid}: {why}\n        {text!r}")
        sys.stdout.flush()
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

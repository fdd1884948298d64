"""The decoder's output constraints as logic: compile, refuse, mask (MLX arrays, no model)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from transformers import AutoTokenizer

from decoder_service.constraints import ConstraintCompiler, GrammarMask
from mmserve_core.wire.errors import InvalidArgument
from mmserve_core.wire.types import Constraint

EOS = [1, 106]


@pytest.fixture(scope="module")
def compiler(ckpt_e2b):
    return ConstraintCompiler(AutoTokenizer.from_pretrained(ckpt_e2b), 512, EOS)


def _drive(compiler, c: Constraint, pick, steps: int = 400) -> tuple[list[int], bool]:
    """Run the mask like the decoder does, choosing tokens with ``pick(allowed)``; -> (ids, ended)."""
    mask = GrammarMask(compiler.matcher(compiler.compile(c)), 512, EOS)
    context = [2, 105, 10, 106, 105]
    for _ in range(steps):
        out = np.asarray(mask(mx.array(context), mx.zeros((1, 512))))[0]
        allowed = np.nonzero(np.isfinite(out))[0]
        assert allowed.size, "the mask never empties"
        t = int(pick(allowed))
        if t in EOS:
            return context[5:], True
        context.append(t)
    return context[5:], False


def test_a_schema_drives_to_a_valid_document_and_eos_only_at_the_end(compiler):
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "yy"]}, "b": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
              "required": ["a", "b"], "additionalProperties": False}
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids, ended = _drive(compiler, Constraint("json_schema", json.dumps(schema)), lambda a: rng.choice(a))
        assert ended
        text = compiler.tokenizer.decode_str(ids)
        doc = json.loads(text)
        assert doc["a"] in ("x", "yy") and 0 <= doc["b"] <= 99


def test_json_object_with_shortest_choices_terminates(compiler):
    closing = [compiler.tokenizer.tokenize_str(ch)[0] for ch in ("}", '"')]

    def shortest(allowed):  # end, else close something, else the lowest id
        for t in (*EOS, *closing):
            if t in allowed:
                return t
        return allowed[0]

    ids, ended = _drive(compiler, Constraint("json_object"), shortest)
    assert ended and isinstance(json.loads(compiler.tokenizer.decode_str(ids)), dict)


def test_regex_and_refusals(compiler):
    ids, ended = _drive(compiler, Constraint("regex", "(ab|cd){2}"), lambda a: a[0])
    assert ended and compiler.tokenizer.decode_str(ids) in {"abab", "abcd", "cdab", "cdcd"}
    with pytest.raises(InvalidArgument, match="(?s)the output constraint .*look-around"):
        compiler.compile(Constraint("json_schema", json.dumps({"type": "string", "pattern": "(?=a)"})))
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        compiler.compile(Constraint("json_schema", "{nope"))


def test_compiled_grammars_are_cached_by_digest(compiler):
    c = Constraint("regex", "[0-9]+")
    assert compiler.compile(c) is compiler.compile(Constraint("regex", "[0-9]+"))

"""The decoder's output constraints as logic: compile, refuse, mask — row by row and for a whole batch
step (MLX arrays, no model)."""

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


def test_the_batch_masks_equal_each_rows_own_mask(compiler):
    """``BatchMasks`` (one parallel fill and one ``where`` for the step) allows exactly what each
    row's own ``GrammarMask`` allows, a row without a constraint keeps every token, and the
    matchers advance by the tokens the rows sampled."""
    from decoder_service.constraints import BatchMasks

    specs = [Constraint("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                   "required": ["a"]})),
             Constraint("json_schema", json.dumps({"type": "array", "items": {"enum": ["x", "yz"]}, "minItems": 1}))]

    def mask(c):
        return GrammarMask(compiler.matcher(compiler.compile(c)), 512, EOS)

    solo, batched = [mask(c) for c in specs], [mask(c) for c in specs]
    rows = [batched[0], None, batched[1]]  # the middle row is unconstrained
    contexts = [[2, 105, 10], [2, 105, 10]]
    rng, masks = np.random.default_rng(0), BatchMasks()
    for step in range(14):
        want = [np.isfinite(np.asarray(m(mx.array(ctx), mx.zeros((1, 512))))[0]) for m, ctx in zip(solo, contexts)]
        if step:  # the batch consumes the tokens sampled last step, then masks
            last = mx.array([contexts[0][-1], 7, contexts[1][-1]])[:, None]
            got = np.isfinite(np.asarray(masks.apply(last, mx.zeros((3, 1, 512)), rows)))[:, 0]
            assert (got[0] == want[0]).all() and (got[2] == want[1]).all() and got[1].all(), step
        for ctx, w in zip(contexts, want):
            allowed = [t for t in np.nonzero(w)[0] if t not in EOS] or list(np.nonzero(w)[0])
            ctx.append(int(rng.choice(allowed)))

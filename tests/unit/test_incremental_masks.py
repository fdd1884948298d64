"""Per-step logits processors read only what a step added: the grammar mask and the thought budget
never copy a sequence's whole context again (that made a long sequence's masking O(n²))."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from decoder_service.constraints import GrammarMask, new_tokens
from decoder_service.thought_budget import ThoughtBudget


class Context:
    """A sequence's ids that refuse to be copied whole after the first read."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.whole_reads = list(ids), 0

    @property
    def shape(self):
        return (1, len(self.ids))

    def reshape(self, *_):
        return self

    def __getitem__(self, sl):
        if sl.start in (None, 0):
            self.whole_reads += 1
        return np.asarray(self.ids[sl])

    def __array__(self, *a, **k):
        raise AssertionError("the whole context was copied")


class Matcher:
    def __init__(self) -> None:
        self.consumed: list[int] = []

    def consume_token(self, t: int) -> None:
        self.consumed.append(t)

    def is_error(self) -> bool:
        return False

    def compute_bitmask(self) -> bytes:
        return np.full(4, 0xFFFFFFFF, dtype=np.uint32).tobytes()


def test_new_tokens_slices_before_copying():
    assert new_tokens(mx.array([[1, 2, 3, 4]]), 2) == [3, 4]
    assert new_tokens(np.array([5, 6, 7]), 1) == [6, 7]
    assert new_tokens([8, 9], 0) == [8, 9]


def test_thought_budget_and_grammar_mask_read_only_new_tokens():
    ctx = Context([2, 105, 100])  # the prompt opens a thought channel (100)
    budget = ThoughtBudget(3, open_id=100, close_id=101)
    m = Matcher()
    mask = GrammarMask(m, vocab_size=128, eos_ids=[1])
    logits = mx.zeros((1, 128))
    for _ in range(20):
        budget(ctx, logits)
        mask(ctx, logits)
        ctx.ids.append(7)
    assert ctx.whole_reads == 1  # the prompt, once (the budget's first look); never again
    assert m.consumed == [7] * 19  # each generated token consumed once, in order
    out = budget(ctx, logits)
    assert int(mx.argmax(out[0]).item()) == 101  # the budget is spent: only the close is allowed

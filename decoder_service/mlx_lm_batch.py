"""The one place the decoder leans on mlx-lm's ``BatchGenerator`` beyond its public API.

Why: the batched grammar mask (``constraints.BatchMasks``) must know, for each model call the batch
makes inside ``BatchGenerator.next()``, which sequence each row is.  mlx-lm does not expose that; it
is read from two facts about mlx-lm 0.32 (the minor version ``pyproject.toml`` pins and
``tests/rpc/test_mlx_lm_batch.py`` checks — that test fails loudly if an upgrade changes either):

1. ``bg._generation_batch.uids`` lists the running rows in the order the batch feeds them;
2. within one ``next()``, the model is called for the running rows first, then — when sequences
   were inserted since the last step — once for the new rows alone, in insertion order.

Where (1) is missing (another mlx-lm), ``readable`` is False and the scheduler falls back to a
per-row logits processor, which needs neither.  MLX thread only.
"""

from __future__ import annotations

TESTED_MINOR = "0.32"  # mlx-lm's minor version these facts were checked on


def readable(bg) -> bool:
    """Whether this mlx-lm's batch order can be read (else: per-row masks)."""
    return hasattr(bg, "_generation_batch")


def running_uids(bg) -> list[int]:
    """The uids of the rows the next step feeds first, in row order (fact 1)."""
    gen = getattr(bg, "_generation_batch", None)
    return list(gen.uids) if gen is not None else []


def step_calls(bg, inserted: list[int]) -> list[list[int]]:
    """The row uids of each model call the coming ``next()`` makes, in call order (fact 2)."""
    return [c for c in (running_uids(bg), list(inserted)) if c]

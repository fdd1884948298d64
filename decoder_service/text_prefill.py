"""Text prompts prefilled together, one chunk per scheduler step (mlx-lm's ``PromptProcessingBatch``).

Why: prefilling each new sequence alone, one per decode step, left a burst of
requests queued while decode slots sat idle, and one long prompt stalled every
running stream for its whole prefill.  Here the text prompts waiting to join
are run through the model together (right-padded, mlx-lm's batch caches), a
bounded chunk of each per scheduler step, so the running batch decodes between
chunks (chunked prefill, as vLLM and SGLang schedule it).  When nothing is
decoding the chunks are mlx-vlm's own prefill step (2,048 tokens).

Only ``prompt[:-1]`` is computed here: a finished row is handed to the decode
batch with its last prompt token as its next input, so its first sample is
drawn — and constrained, penalised, logprob'd — by the batch like any other.
Media prompts never come here: their soft tokens, per-layer inputs and image
blocks need the LM's own inputs (``media_prefill``), one prompt at a time; the
scheduler shares each step's budget between the two.

Thread ownership: the decoder's MLX thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

IDLE_CHUNK = 2048  # mlx-vlm's prefill_step_size: nothing is waiting on us


@dataclass
class _Row:
    item: Any          # the scheduler's record of this sequence (a ``sequences.Sequence``)
    rest: list[int]    # prompt tokens still to compute (the last prompt token excluded)
    fed: list[int]     # tokens whose KV is in the row's cache
    point: int = 0     # a chunk ends here and the one after runs to the end (``prefix_cache.store_point``)


class TextPrefill:
    """Rows prefilling together; ``step`` runs one chunk of each and returns the finished ones."""

    def __init__(self, forward, *, budget_tokens: int) -> None:
        from mlx_lm.generate import PromptProcessingBatch, greedy_sampler

        self._forward = forward
        self.budget_tokens = max(1, budget_tokens)
        self._batch = PromptProcessingBatch.empty(forward, greedy_sampler, prefill_step_size=1 << 30)
        self._rows: list[_Row] = []
        self.batched_steps = 0  # steps that ran more than one row (read by tests from other threads)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, item: Any, ids: list[int], cache: list, hit: int, point: int = 0) -> None:
        """Queue ``ids`` (``cache`` already holds ``ids[:hit]``, ``hit < len(ids) - 1``); ``point``: the
        last chunk starts there (or before), so the cache at the end can be cut back to it."""
        from mlx_lm.generate import PromptProcessingBatch

        self._batch.extend(PromptProcessingBatch(
            self._forward, [len(self._rows)], [cache], tokens=[list(ids[:hit])], prefill_step_size=1 << 30,
            samplers=[None], logits_processors=[[]], stop_sequences=[None], max_tokens=[1]))
        self._rows.append(_Row(item, list(ids[hit:-1]), list(ids[:hit]), point))

    def step(self, *, busy: bool, budget: int | None = None) -> list[tuple[Any, list, list[int]]]:
        """Run one chunk of every row: ``busy`` (others are decoding) bounds the chunk so the whole
        step computes about ``budget`` tokens (``budget_tokens`` unless the scheduler gave part of
        the step's budget to a media prompt), at least 16 a row; otherwise mlx-vlm's 2,048 a row.
        Returns ``(item, cache, fed)`` for each row whose prompt (but its last token) is now all in KV."""
        if not self._rows:
            return []
        budget = self.budget_tokens if budget is None else budget
        width = max(16, budget // len(self._rows)) if busy else IDLE_CHUNK
        chunks = [r.rest[:chunk_width(len(r.fed), len(r.fed) + len(r.rest), width, r.point)] for r in self._rows]
        self._batch.prompt(chunks)
        if len(self._rows) > 1:
            self.batched_steps += 1
        done, keep = [], []
        for i, (r, c) in enumerate(zip(self._rows, chunks)):
            r.fed += c
            r.rest = r.rest[len(c):]
            if r.rest:
                keep.append(i)
            else:
                done.append((r.item, self._batch.extract_cache(i), r.fed))
        if done:
            self._keep(keep)
            mx.eval([c.state for _, cache, _ in done for c in cache])
        return done

    def drop(self, gone) -> list[Any]:
        """Remove the rows whose item ``gone(item)`` says should go; return those items."""
        flags = [bool(gone(r.item)) for r in self._rows]  # asked once: a flag may be set meanwhile
        if not any(flags):
            return []
        out = [r.item for r, f in zip(self._rows, flags) if f]
        self._keep([i for i, f in enumerate(flags) if not f])
        return out

    def clear(self) -> list[Any]:
        out = [r.item for r in self._rows]
        self._keep([])
        return out

    def _keep(self, keep: list[int]) -> None:
        self._batch.filter(keep)
        self._rows = [self._rows[i] for i in keep]


def chunk_width(pos: int, end: int, width: int, point: int) -> int:
    """Tokens of the next chunk from ``pos`` (of ``end``): ``width`` — except that the last chunk must
    start at or before ``point`` (``prefix_cache.rewound`` cuts the cache back there afterwards), so
    a chunk that would end past the point without reaching ``end`` ends at the point, and the chunk
    from the point takes the rest (a generation prompt's few tokens)."""
    if 0 < point < end:
        if pos >= point:
            return end - pos
        if pos + width < end and pos + width > point:
            return point - pos
    return width

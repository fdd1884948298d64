"""Media prompts prefilled a bounded chunk per scheduler step while other sequences decode.

Why: a media prompt (soft-token rows written into the embeddings: images, audio) was prefilled
whole, and a 3,000-4,000-token one stopped every running stream for its whole prefill (the
running stream's largest gap was 0.8x that prefill).  Here it is computed a chunk at a time
(``LanguageModelRunner.prefill_chunk``), each chunk about the step's share of the prefill token
budget (``--prefill-budget-tokens``, shared with ``TextPrefill``: one token budget per step for
prefill, as vLLM schedules it), so the running batch decodes between chunks.

* One media sequence prefills at a time, first come first served; the others wait their turn
  holding their slot.  Their inputs (embeddings with the soft tokens written in, per-layer inputs,
  token types) are built at their first chunk and kept until their last.
* On a checkpoint with bidirectional image attention (26B-A4B, 31B) a chunk never splits an image
  block: a block is a chunk's unit, and one larger than the budget is a chunk on its own.  The
  block's overlay is applied at any cache offset (``mlx_vlm_masks``).
* When nothing else is decoding and nothing of the prompt is computed yet, the prompt takes
  ``LanguageModelRunner.prefill`` — mlx-vlm's own path (2,048-token chunks, or one pass where its
  ``chunked_prefill_policy`` says so) — so single-request parity with mlx-vlm is unchanged; one
  already begun continues in mlx-vlm's 2,048-token chunks.

A finished prompt comes back with its cache and its last position's logits; the scheduler samples
its first token from them exactly as for a prompt prefilled whole.

Thread ownership: the decoder's MLX thread only (the scheduler's); ``len`` may be read anywhere.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from decoder_service.mlx_vlm_masks import block_spans
from decoder_service.model import LanguageModelRunner, PromptFeatures, SpanRows
from decoder_service.text_prefill import IDLE_CHUNK, chunk_width


@dataclass
class _Row:
    """One media prompt on its way into KV."""

    item: Any                 # the scheduler's record of this sequence (a ``sequences.Sequence``)
    ids: list[int]
    spans: list[SpanRows]
    cache: list               # holds the prompt's positions [0, pos)
    pos: int                  # the position reached (a prefix-cache hit starts past 0)
    feats: PromptFeatures | None = None      # built at its first chunk
    blocks: list[tuple[int, int]] = field(default_factory=list)  # image blocks no chunk may split
    chunks: int = 0           # model calls it took so far
    point: int = 0            # a chunk ends here; the one after runs to the end (``prefix_cache``)


@dataclass
class StepResult:
    """What one ``MediaPrefill.step`` did: prompt tokens computed, prompts finished
    ``(item, cache, last logits)``, prompts failed ``(item, error)``."""

    spent: int = 0
    done: list[tuple[Any, list, Any]] = field(default_factory=list)
    failed: list[tuple[Any, BaseException]] = field(default_factory=list)


class MediaPrefill:
    """Media prompts waiting to join the batch; ``step`` runs one chunk of the first one."""

    def __init__(self, runner: LanguageModelRunner, on_filled=None) -> None:
        self._runner = runner
        self._on_filled = on_filled  # (item, cache, tokens it holds): the scheduler's cache point
        self._rows: deque[_Row] = deque()
        self.last_chunks = 0  # model calls the last finished prompt took (read by tests from other threads)
        self.chunks_run = 0  # chunks computed, all prompts together (read by tests from other threads)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, item: Any, ids: list[int], spans: list[SpanRows], cache: list, start: int,
            point: int = 0) -> None:
        """Queue a prompt whose ``cache`` already holds ``ids[:start]`` (``start < len(ids)``); its last
        chunk starts at or before ``point`` (``text_prefill.chunk_width``)."""
        self._rows.append(_Row(item, list(ids), list(spans), cache, start, point=point))

    def step(self, *, busy: bool, tokens: int) -> StepResult:
        """Run one chunk of the first prompt: about ``tokens`` of it while ``busy`` (others are
        decoding), else mlx-vlm's exact prefill (a prompt not yet begun) or its 2,048-token chunk.
        A prompt whose chunk raises is dropped and returned in ``failed``: its own problem."""
        if not self._rows:
            return StepResult()
        r = self._rows[0]
        try:
            if not busy and r.feats is None:  # nothing waits on us: mlx-vlm's own prefill, whole
                spent = len(r.ids) - r.pos
                r.cache, logits = self._runner.prefill(r.ids, r.spans, cache=r.cache, start=r.pos, point=r.point,
                                                       on_filled=self._filled(r))
                r.chunks, r.pos = r.chunks + 1, len(r.ids)
            else:
                spent, logits = self._chunk(r, tokens if busy else IDLE_CHUNK)
        except Exception as e:  # noqa: BLE001 - this prompt's problem: the scheduler answers its waiter
            self._rows.popleft()
            return StepResult(failed=[(r.item, e)])
        if logits is None:
            return StepResult(spent)
        self._rows.popleft()
        self.last_chunks = r.chunks
        return StepResult(spent, done=[(r.item, r.cache, logits)])

    def _chunk(self, r: _Row, width: int) -> tuple[int, Any]:
        """Compute the row's next chunk; return (its tokens, the final logits or None)."""
        if r.feats is None:
            r.feats = self._runner.prompt_features(r.ids, r.spans)
            if self._runner.bidirectional_vision:
                r.blocks = block_spans(r.feats.types)
        hi = chunk_end(r.pos, len(r.ids), chunk_width(r.pos, len(r.ids), width, r.point), r.blocks)
        last = hi == len(r.ids)
        logits = self._runner.prefill_chunk(r.feats, r.cache, r.pos, hi, last=last)
        spent, r.pos, r.chunks = hi - r.pos, hi, r.chunks + 1
        self.chunks_run += 1
        if last:
            r.feats = None  # the prompt's inputs are not needed past its last chunk
            if self._on_filled is not None:
                self._on_filled(r.item, r.cache, hi)
        return spent, logits

    def _filled(self, r: _Row):
        if self._on_filled is None:
            return None
        return lambda cache, n: self._on_filled(r.item, cache, n)

    def drop(self, gone) -> list[Any]:
        """Remove the prompts whose item ``gone(item)`` says should go (their KV goes with them);
        return those items."""
        flags = [bool(gone(r.item)) for r in self._rows]  # asked once: a flag may be set meanwhile
        out = [r.item for r, f in zip(self._rows, flags) if f]
        if out:
            self._rows = deque(r for r, f in zip(self._rows, flags) if not f)
        return out

    def clear(self) -> list[Any]:
        out = [r.item for r in self._rows]
        self._rows.clear()
        return out


def chunk_end(pos: int, total: int, width: int, blocks: list[tuple[int, int]]) -> int:
    """Where a chunk from ``pos`` of about ``width`` tokens ends without splitting a block: before
    the block it would cut, or — a block starting at ``pos`` — at that block's end."""
    end = min(total, pos + max(1, width))
    for start, stop in blocks:
        if start < end < stop:
            return start if start > pos else stop
    return end

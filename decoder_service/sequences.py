"""Every sequence the decoder's MLX thread holds: one record each, its phase named, one table.

Why: a sequence used to live in one of several places (the requests being placed, the text
prefill's rows, the media prefill's rows, the solo slot, the batch's uid map), each with its own
record type, and a failed step had to sweep them all to reach every waiter — one place forgotten
and that waiter hung.  Here a ``Sequence`` is created when its request leaves the ``RequestQueue``
and stays in the ``SequenceTable`` until it is finished (completion, error or cancellation);
``TextPrefill`` and ``MediaPrefill`` keep only their working state (caches, offsets) and point at
the record.  A failed step fails ``take_all()``: whatever a sequence was doing, it is in the table.

Phases and the moves between them (``SequenceTable.move`` checks each against ``NEXT``)::

    RequestQueue ──take──▶ OPENING ──▶ PREFILL_TEXT ────────────────────────▶ BATCH
                              │    ──▶ PREFILL_MEDIA ──(first token)──▶ SOLO | BATCH
                              └──(prefilled whole; or all but its last token cached)──▶ SOLO | BATCH
                                                             SOLO ──(company)──▶ BATCH
    any phase ──▶ DONE  (completion or error emitted, or cancelled: the record leaves the table)

Thread ownership: the decoder's MLX thread only (the scheduler's), but ``len(table)`` and
``table.solo`` may be read from any thread (a dict's length, an attribute: atomic under the GIL).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from decoder_service.model import SpanRows
from decoder_service.sampling import ResolvedSampling


@dataclass
class GenerationJob:
    """One request as the MLX thread sees it.  ``emit`` takes events or an exception."""

    ids: list[int]
    spans: list[SpanRows]
    sampling: ResolvedSampling
    stop_ids: frozenset[int]
    soft_tokens: int
    emit: object  # Callable[[object], None]
    media: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, media key) per span
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    counted: bool = False  # holds a place in the scheduler's admission count (released once)
    finish_on_cancel: bool = False  # the consumer matched a stop string: answer the cancel with a Completion
    priority: int = 1  # index into T.PRIORITIES: waiting jobs of a higher one are placed first
    cache_point: int = 0  # where the conversation's next turn departs (0 = not said): ``prefix_cache``


class Phase(enum.Enum):
    """Where a held sequence's work stands (and so which structure holds its KV)."""

    OPENING = "opening"              # taken off the queue: sampler, prefix lookup (alone: prefilled whole)
    PREFILL_TEXT = "prefill_text"    # a row of ``TextPrefill``
    PREFILL_MEDIA = "prefill_media"  # a row of ``MediaPrefill``
    SOLO = "solo"                    # decoding alone: plain caches (``cache``, ``fed``, ``pending``),
                                     # or with a drafter its ``spec`` stream
    BATCH = "batch"                  # a row of mlx-lm's ``BatchGenerator`` (``uid``)
    DONE = "done"                    # finished, failed or cancelled: out of the table


NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.OPENING: frozenset({Phase.PREFILL_TEXT, Phase.PREFILL_MEDIA, Phase.SOLO, Phase.BATCH, Phase.DONE}),
    Phase.PREFILL_TEXT: frozenset({Phase.BATCH, Phase.DONE}),  # its first token is the batch's to sample
    Phase.PREFILL_MEDIA: frozenset({Phase.SOLO, Phase.BATCH, Phase.DONE}),
    Phase.SOLO: frozenset({Phase.BATCH, Phase.DONE}),  # company arrived: it joins the batch
    Phase.BATCH: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


@dataclass(eq=False)  # a record is itself: compared and hashed by identity
class Sequence:
    """One request from the moment the MLX thread takes it off the queue until it is finished."""

    job: GenerationJob
    phase: Phase = Phase.OPENING
    kids: list = field(default_factory=list)  # the prompt's prefix-cache keys (``keyed_tokens``)
    started: float = 0.0  # when it was opened (its queue time ends here)
    first_at: float | None = None  # when its first token was delivered
    cached: int = 0  # prompt tokens its prefix-cache hit supplied
    generated: int = 0
    sampler: object = None
    processors: list = field(default_factory=list)
    uid: int | None = None  # BATCH: its row's uid in the ``BatchGenerator``
    mask: object = None  # BATCH: its ``GrammarMask``, applied with the batch's others in one operation
    fresh: bool = False  # BATCH: its next input is its last prompt token (no sample to consume yet)
    cache: list | None = None  # SOLO: its plain KV caches
    fed: list[int] | None = None  # SOLO: every token whose KV is in ``cache``: prompt + generated
    pending: tuple | None = None  # SOLO: (next token [1], its logprobs [1, V]) — launched, not yet read
    spec: object = None  # SOLO with a drafter: its ``SpecStream`` (cache, fed, next input, drafter state)
    policy: object = None  # with a drafter: its ``DraftPolicy`` (how deep it drafts; solo, then batched)
    drafted: int = 0  # draft tokens proposed for it, and how many were accepted (usage)
    accepted: int = 0


class SequenceTable:
    """The one registry of the sequences the MLX thread holds, with the indexes the loop needs:
    batch uid -> sequence, and the solo one.  A move ``NEXT`` does not allow is a bug and raises."""

    def __init__(self) -> None:
        self._held: dict[int, Sequence] = {}  # id(record) -> record, in the order taken
        self._batch: dict[int, Sequence] = {}  # batch uid -> record
        self.solo: Sequence | None = None

    def __len__(self) -> int:
        """Slots taken: every phase but DONE holds one (read from any thread)."""
        return len(self._held)

    def __iter__(self) -> Iterator[Sequence]:
        """A snapshot of the held sequences, in the order taken (safe to finish them meanwhile)."""
        return iter(list(self._held.values()))

    def take(self, job: GenerationJob) -> Sequence:
        """Hold a request just taken off the queue (OPENING): from here a failed step reaches it."""
        seq = Sequence(job)
        self._held[id(seq)] = seq
        return seq

    def move(self, seq: Sequence, phase: Phase, *, uid: int | None = None) -> None:
        """The one place a sequence changes phase (``uid``: its batch row, entering BATCH)."""
        if phase not in NEXT[seq.phase] or self._held.get(id(seq)) is not seq:
            raise RuntimeError(f"sequence cannot move from {seq.phase.name} to {phase.name}")
        if phase is Phase.BATCH and (uid is None or uid in self._batch):
            raise RuntimeError(f"a sequence joins the batch under a new uid, not {uid!r}")
        if phase is Phase.SOLO and self.solo is not None:
            raise RuntimeError("a second sequence cannot decode solo")
        self._leave(seq)
        seq.phase = phase
        if phase is Phase.BATCH:
            seq.uid = uid
            self._batch[uid] = seq
        elif phase is Phase.SOLO:
            self.solo = seq
        elif phase is Phase.DONE:
            del self._held[id(seq)]

    def _leave(self, seq: Sequence) -> None:
        """Drop ``seq`` from its phase's index (the solo caches go with the solo slot)."""
        if seq.phase is Phase.BATCH:
            self._batch.pop(seq.uid, None)
        elif seq.phase is Phase.SOLO:
            self.solo = None
            seq.cache = seq.fed = seq.pending = seq.spec = None

    def finish(self, seq: Sequence) -> None:
        """``seq`` is finished, failed or cancelled: it leaves the table (and its index)."""
        self.move(seq, Phase.DONE)

    def take_all(self) -> list[Sequence]:
        """Every held sequence, once each, whatever its phase — all finished (DONE) and the table
        empty: a failed step answers each one, and none can be missed."""
        out = list(self._held.values())
        for seq in out:
            self._leave(seq)
            seq.phase = Phase.DONE
        self._held.clear()
        return out

    def batched(self, uid: int) -> Sequence | None:
        """The sequence decoding in the batch under ``uid`` (None: finished or cancelled)."""
        return self._batch.get(uid)

    def in_batch(self) -> list[Sequence]:
        return list(self._batch.values())

    def count(self, phase: Phase) -> int:
        return sum(1 for s in self._held.values() if s.phase is phase)

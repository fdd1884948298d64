"""The scheduler's drafting steps (``--draft-model``): a sequence alone drafting in its own loop,
and drafting rounds over the running batch, with their per-request and Prometheus counts.

Why apart: the scheduler's loop decides *when* (a solo step, a batch step); how a step drafts is
its own concern — ``speculative`` (one sequence) and ``batch_drafting`` (the batch) do the MLX
work, this mixin ties them to the scheduler's sequences, gate and metrics.

Thread ownership: the decoder's MLX thread (the scheduler's), like everything it calls.
"""

from __future__ import annotations

import time

from decoder_service import mlx_lm_batch
from decoder_service.batch_drafting import batch_round
from decoder_service.drafter import DraftPolicy
from decoder_service.sequences import Sequence
from decoder_service.speculative import spec_round


class DraftingSteps:
    """Mixed into ``BatchScheduler``: reads its ``drafter``, ``gate``, ``runner``, ``sequences``,
    ``metrics``, ``_hidden``, ``_new_uids``, ``_read_layers``, ``draft_max_batch`` and calls its
    ``_deliver`` / ``_store`` / ``_respond``."""

    def _policy(self, seq: Sequence) -> DraftPolicy:
        """The sequence's drafting depth policy (one for its life: solo, then in the batch)."""
        if seq.policy is None:
            seq.policy = DraftPolicy(self.drafter.block_size - 1)
        return seq.policy

    def _spec_step(self, seq: Sequence) -> None:
        """One drafting round of the solo sequence: its 1..k+1 verified tokens, delivered in order
        (a stop or the token budget ends it part-way; its KV then holds what the round fed)."""
        st, job = seq.spec, seq.job
        before = (st.policy.drafted, st.policy.accepted)
        emitted = spec_round(self.runner.lm, self.runner.suppress, self.drafter, st, seq.sampler,
                             seq.processors, job.sampling.max_tokens - seq.generated)
        self._count_drafts(seq, before)
        for token, logprobs in emitted:
            seq.generated += 1
            if self._deliver(seq, token, None, logprobs):
                self._store(seq, st.plain_cache(), st.fed)
                return

    def _count_drafts(self, seq: Sequence, before: tuple[int, int]) -> None:
        """What the last round drafted and accepted for ``seq`` (its usage, the counters)."""
        drafted, accepted = seq.policy.drafted - before[0], seq.policy.accepted - before[1]
        seq.drafted += drafted
        seq.accepted += accepted
        if self.metrics is not None and drafted:
            m = self.metrics
            m.draft_tokens.inc(drafted)
            m.draft_accepted_tokens.inc(accepted)
            m.draft_rounds.inc()
            for p in range(1, drafted + 1):
                m.draft_position.labels(str(p)).inc()
                if p <= accepted:
                    m.draft_position_accepted.labels(str(p)).inc()

    def _draft_round(self, bg) -> bool:
        """A drafting round over the running batch (``batch_drafting``), when every row can take
        part: no rows waiting to join (they join at the next plain step), at most ``draft_max_batch``
        rows, the gate expects
        the round to beat plain steps at this batch size (``DraftGate``: measured times), and some
        row drafting.  False: step plainly."""
        gb = mlx_lm_batch.generation_batch(bg)
        if gb is None or not gb.uids or self._new_uids or mlx_lm_batch.admitting(bg):
            return False
        if len(gb.uids) > self.draft_max_batch:
            return False
        seqs = [self.sequences.batched(u) for u in gb.uids]
        if any(s is None or s.policy is None for s in seqs):
            return False
        rows = len(seqs)
        if not self.gate.want(rows):
            return False
        before = [(s.policy.drafted, s.policy.accepted) for s in seqs]
        t0 = time.perf_counter()
        out = batch_round(gb, self.runner.lm, self.runner.suppress, self.drafter, [s.policy for s in seqs],
                          [self._hidden.get(u) for u in gb.uids], self._read_layers, [s.mask for s in seqs])
        if out is None:
            return False
        responses, self._hidden = out
        self.gate.drafted(rows, time.perf_counter() - t0, len(responses) / rows)
        for s, b in zip(seqs, before):
            self._count_drafts(s, b)
        self._respond(bg, responses)
        return True

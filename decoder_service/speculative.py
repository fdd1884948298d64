"""One sequence's speculative decoding round: draft, verify in one forward, accept, roll back.

Why: a drafted token is worth emitting only if it is the very token the target would have
produced there, with everything the decoder applies to a sampled token applied to it.  So each
position of the verify block goes through the same steps a plain step takes — the sequence's
logits processors (logit bias, penalties, the thought budget, the grammar mask) over the context
that position would have had, the suppressed media ids, then its own sampler — and a draft is
accepted only while it equals that sample (mlx-vlm's exact-match walk, not p/q rejection sampling):
greedy output is token-identical to decoding without a drafter, a seeded sampler draws the same
key chain (one split per emitted token, as without), an unseeded one the same distribution.
Stateful processors only ever see accepted tokens — the walk stops at the first disagreement —
so none needs rolling back.  The target's K/V of rejected positions is trimmed off
(``mtp_adapter.rollback_ready`` makes sliding-window layers trimmable past their window).

With no processors and a greedy sampler (the common case) the block is read in one argmax; else
position by position (one host read each, stopping at the first rejection).

MLX thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from decoder_service import mtp_adapter
from decoder_service.drafter import Drafter, DraftPolicy  # noqa: F401 - Drafter: the type spec_round takes
from decoder_service.sampler import greedy


@dataclass
class SpecStream:
    """A sequence decoding with a drafter: ``cache`` (rollback-ready) holds ``fed``; ``bonus`` is
    its last emitted token, not yet fed; ``hidden`` / ``shared_kv`` are what the drafter reads
    (None until the first forward after prefill)."""

    cache: list
    fed: list[int]
    bonus: int
    policy: DraftPolicy
    hidden: mx.array | None = None
    shared_kv: dict | None = None

    @classmethod
    def start(cls, cache: list, fed: list[int], bonus: int, policy: DraftPolicy) -> SpecStream:
        return cls(mtp_adapter.rollback_ready(cache), fed, bonus, policy)

    def plain_cache(self) -> list:
        """The cache as the batch and the prefix cache take it."""
        return mtp_adapter.plain(self.cache)


def spec_round(lm, suppress: mx.array, drafter: Drafter, st: SpecStream, sampler, processors: list,
               remaining: int) -> list[tuple[int, mx.array]]:
    """Emit 1..k+1 tokens (each with its logprobs [1, V]); ``st`` advanced past what it fed.

    ``remaining`` (≥ 1): tokens the sequence may still emit; a round never emits more."""
    from mlx_vlm.generate.ar import generation_stream

    k = st.policy.next_k(remaining) if st.hidden is not None else 0
    with mx.stream(generation_stream):
        block = mx.array([[st.bonus]], dtype=mx.int32)
        if k:  # the drafts stay lazy: drafting and verifying are one graph, evaluated once
            block = mx.concatenate([block, mx.array(drafter.draft(st, k), dtype=mx.int32).reshape(1, k)], axis=1)
        logits, hidden, shared = mtp_adapter.forward(lm, block, st.cache)
        logits = logits[0] + suppress.astype(logits.dtype)  # [k+1, V]
        mx.async_eval(logits, block)
    drafts = block[0, 1:].tolist()
    if sampler is greedy and not processors:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.argmax(logprobs, axis=-1).tolist()
        a = 0
        while a < k and targets[a] == drafts[a]:
            a += 1
        emitted = [(int(targets[j]), logprobs[j: j + 1]) for j in range(a + 1)]
    else:
        emitted = walk(logits, drafts, st.fed + [st.bonus], sampler, processors)
        a = len(emitted) - 1
    mtp_adapter.trim(st.cache, k - a)
    st.fed.extend([st.bonus, *drafts[:a]])
    st.bonus = emitted[-1][0]
    st.hidden = mtp_adapter.draft_hidden(lm, hidden[:, a: a + 1])
    st.shared_kv = mtp_adapter.drop_rejected(shared, k - a)
    st.policy.record(k, a)
    return emitted


def walk(logits: mx.array, drafts: list[int], context: list[int], sampler, processors: list, mask=None):
    """Position by position: processors over the context that position has, the grammar ``mask``
    if the caller applies it outside the processors (the batch's rows: it consumes each accepted
    token here), then the sampler; stop at the first sample that differs from the draft (it is
    emitted: the target's own token).  ``[(token, logprobs [1, V])]``; ``context`` is extended."""
    out = []
    for j in range(len(drafts) + 1):
        row = logits[j: j + 1]
        if processors:
            ctx = mx.array(context)
            for p in processors:
                row = p(ctx, row)
        if mask is not None:
            row = mask.masked(row)
        logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
        token = int(sampler(logprobs).item())
        out.append((token, logprobs))
        if j == len(drafts) or token != drafts[j]:
            break
        context.append(token)
        if mask is not None:
            mask.consume(token)
    return out

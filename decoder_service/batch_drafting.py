"""MTP drafting for the rows of the running batch: one round drafts, verifies and rolls back every
row at once, each row accepting its own number of tokens.

Why here and not in mlx-vlm's speculative batch: that one cannot take new rows while it runs,
accepts only as many tokens as its worst row and applies only the sampler.  The decoder's batch is
mlx-lm's ``BatchGenerator``; between two of its steps this module runs a round on the same
``GenerationBatch`` (same caches, samplers, processors, stop matchers), so rows keep joining and
leaving at step boundaries as they always do:

1. each row's pending token ``y`` (sampled by the last step, not yet emitted nor in the KV) is the
   round's first input; the drafter proposes ``k_i`` tokens after it (per-row depth,
   ``DraftPolicy``), reading the row's own K/V (``extract`` of the two layers it reads: the batch's
   left padding and a wrapped window handled by the caches themselves) and the hidden state the
   last step left for that row;
2. one forward of ``[y_i, d_i1 .. d_iK]`` for all rows (shorter rows padded: their extra positions
   are never accepted) inside mlx-vlm's speculative cache transaction;
3. per row, position by position, the same processors and sampler a plain step applies (the
   exact-match walk of ``speculative``); the row emits ``y`` and its accepted drafts, and the
   target's own token at the first disagreement becomes its new pending token;
4. the transaction keeps exactly ``1 + a_i`` positions of row ``i`` (append caches roll a row's
   rejected tail into left padding; sliding windows are restored and replay only what was kept —
   ``tests/rpc/test_batch_drafting.py`` checks both against one-token steps), and the batch's
   bookkeeping (tokens, processor contexts, counts, stop matchers) advances as ``next()`` would
   have advanced it over the same tokens.  Rows that finish (a stop token, their token budget) are
   extracted and filtered out exactly as ``next()`` does.

Costs: each drafting row's two read layers are copied out per round (``extract``: ~2 of the LM's
layers' KV) and padded into one batch for the drafter, which drafts every row at once (each row
at its own position).  A row with a
grammar mask (structured output, a forced tool call) has it applied at every verify position and
consuming what the row emits, as the batch's own step would.  The facts about mlx-lm 0.32's ``GenerationBatch`` this relies on are listed in
``mlx_lm_batch`` and checked by ``tests/rpc/test_mlx_lm_batch.py``.

MLX thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from decoder_service import mlx_lm_batch, mtp_adapter
from decoder_service.drafter import Drafter, DraftPolicy
from decoder_service.speculative import walk


@dataclass
class _RowDraft:
    """What the drafter reads for one row (``Drafter.draft`` takes a ``SpecStream``-like record)."""

    bonus: int
    hidden: mx.array
    shared_kv: dict
    fed: list


def read_layers(lm) -> dict[str, int]:
    """layer type -> index of the layer whose cache holds the K/V the drafter reads for it (the
    last layer of the type, or the earlier layer it shares its K/V with)."""
    inner = lm.model
    out = {}
    for i, layer in enumerate(inner.layers):
        out[layer.layer_type] = inner.previous_kvs[i]
    return out


def _row_kv(caches: list, layers: dict[str, int], row: int) -> dict:
    from mlx_vlm.models.cache import RotatingKVCache

    out = {}
    for kind, idx in layers.items():
        c = caches[idx].extract(row)
        keys, values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        if isinstance(c, RotatingKVCache):
            keys, values = c._temporal_order(c.keys), c._temporal_order(c.values)
        out[kind] = (keys, values)
    return out


def _draft_rows(drafter, gb, layers: dict[str, int], rows: list[int], pending: list[int], hidden: list,
                K: int) -> dict[int, mx.array]:
    """``K`` drafts [1, K] for each of ``rows``.  One ``draft_block`` for them all when the drafter is
    mlx-vlm's (each row's K/V right-padded to a common length, its valid length and position its
    own — the same drafts as row by row, checked by a test); row by row for any other drafter."""
    per_row = {i: _row_kv(gb.prompt_cache, layers, i) for i in rows}
    if not isinstance(drafter, Drafter) or len(rows) == 1:
        return {i: mx.array(drafter.draft(_RowDraft(pending[i], hidden[i], per_row[i], gb.tokens[i]), K),
                            dtype=mx.int32).reshape(1, K) for i in rows}
    shared = {}
    for kind in per_row[rows[0]]:
        width = max(per_row[i][kind][0].shape[2] for i in rows)
        ks, vs = [], []
        for i in rows:
            k, v = per_row[i][kind]
            pad = [(0, 0), (0, 0), (0, width - k.shape[2]), (0, 0)]
            ks.append(mx.pad(k, pad))
            vs.append(mx.pad(v, pad))
        shared[kind] = (mx.concatenate(ks), mx.concatenate(vs))
    valid = [len(gb.tokens[i]) for i in rows]
    out = mtp_adapter.draft_rows(drafter.model, [pending[i] for i in rows],
                                 mx.concatenate([hidden[i] for i in rows]), shared, valid, K)
    return {i: out[j: j + 1] for j, i in enumerate(rows)}


def batch_round(gb, lm, suppress: mx.array, drafter, policies: list[DraftPolicy], hidden: list,
                layers: dict[str, int], masks: list | None = None) -> tuple[list, dict[int, mx.array]] | None:
    """One drafting round over the ``GenerationBatch`` ``gb`` (row order = ``gb.uids``).

    ``policies`` / ``hidden`` / ``masks`` per row (``hidden[i]``: normalised [1, 1, H] or None;
    ``masks[i]``: the row's ``GrammarMask``, which the batch otherwise applies in its own step —
    here it masks every verify position and consumes what the row emits).  Returns
    ``(responses, {uid: hidden after})`` — ``GenerationBatch.Response`` objects in row order,
    several per row — or None when no row drafts this round (the caller steps plainly)."""
    from mlx_vlm.generate.ar import generation_stream
    from mlx_vlm.speculative.cache_state import start_speculative_cache

    uids = list(gb.uids)
    B = len(uids)
    pending = mlx_lm_batch.pending_tokens(gb)
    pending_lps = mlx_lm_batch.pending_logprobs(gb)
    remaining = [gb.max_tokens[i] - mlx_lm_batch.emitted(gb, i) for i in range(B)]
    ks = [p.next_k(r) if h is not None else 0 for p, h, r in zip(policies, hidden, remaining)]
    if not any(ks):
        return None
    K = max(ks)
    with mx.stream(generation_stream):
        drafting = [i for i in range(B) if ks[i]]
        drafts = _draft_rows(drafter, gb, layers, drafting, pending, hidden, K)
        rows = []
        for i in range(B):
            if ks[i]:  # positions past k_i are never accepted (the walk stops at k_i)
                rows.append(mx.concatenate([mx.array([[pending[i]]], dtype=mx.int32), drafts[i]], axis=1))
            else:
                rows.append(mx.full((1, K + 1), pending[i], dtype=mx.int32))
        block = mx.concatenate(rows, axis=0)  # [B, 1 + K]
        mtp_adapter.unrotate(gb.prompt_cache)
        tx = start_speculative_cache(gb.prompt_cache, K + 1)
        try:
            logits, h, _ = mtp_adapter.forward(lm, block, gb.prompt_cache)
            logits = logits + suppress.astype(logits.dtype)
            mx.async_eval(logits, block)
            blocks = block.tolist()
            masks = masks or [None] * B
            walks = [_walk_row(gb, i, logits[i], blocks[i][1: 1 + ks[i]], pending[i], masks[i]) for i in range(B)]
            tx.commit([len(w) for w in walks])  # y and the accepted drafts stay in the KV
        except BaseException:
            tx.abort()
            raise
    after = {}
    tokens, lps, nxt, nxt_lps = [], [], [], []
    for i, w in enumerate(walks):
        a = len(w) - 1
        policies[i].record(ks[i], a)
        after[uids[i]] = mtp_adapter.draft_hidden(lm, h[i: i + 1, a: a + 1])
        tokens.append([pending[i], *blocks[i][1: 1 + a]])
        lps.append([pending_lps[i], *(lp for _, lp in w[:a])])
        nxt.append(w[a][0])
        nxt_lps.append(w[a][1])
    return mlx_lm_batch.advance(gb, tokens, lps, nxt, nxt_lps), after


def _walk_row(gb, i: int, logits: mx.array, drafts: list[int], y: int, mask=None) -> list[tuple[int, mx.array]]:
    """Row ``i``'s walk over its verify positions (``logits`` [1 + K, V]): ``[(token, logprobs [V])]``,
    the target's own token at each position up to and including the first that differs from the
    draft there — position ``j`` predicts what follows ``y, d_1 .. d_j``."""
    from decoder_service.sampler import greedy

    sampler = mlx_lm_batch.sampler(gb, i)
    processors = mlx_lm_batch.processors(gb, i)
    out = []
    if sampler is greedy and not processors and mask is None:  # one read for the whole block
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.argmax(lp, axis=-1).tolist()
        for j in range(len(drafts) + 1):
            out.append((int(targets[j]), lp[j]))
            if j == len(drafts) or targets[j] != drafts[j]:
                break
        return out
    if mask is not None:
        mask.consume(y)  # fed now; the batch's own step would have consumed it as its input
    return [(t, lp[0]) for t, lp in walk(logits, drafts, [*gb.tokens[i], y], sampler, processors, mask)]

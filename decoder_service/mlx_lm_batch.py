"""The one place the decoder leans on mlx-lm's ``BatchGenerator`` beyond its public API.

Why: the batched grammar mask (``constraints.BatchMasks``) must know, for each model call the batch
makes inside ``BatchGenerator.next()``, which sequence each row is.  mlx-lm does not expose that; it
is read from two facts about mlx-lm 0.32 (the minor version ``pyproject.toml`` pins and
``tests/rpc/test_mlx_lm_batch.py`` checks — that test fails loudly if an upgrade changes either):

1. ``bg._generation_batch.uids`` lists the running rows in the order the batch feeds them;
2. within one ``next()``, the model is called for the running rows first, then — when sequences
   were inserted since the last step — once for the new rows alone, in insertion order.

Where (1) is missing (another mlx-lm), ``readable`` is False and the scheduler falls back to a
per-row logits processor, which needs neither.

Drafting in the batch (``batch_drafting``) runs a round on the same ``GenerationBatch`` between two
``next()`` calls, so it also relies on how that batch keeps its state between steps:

3. ``_next_tokens`` [B] / ``_next_logprobs`` (per row [V]) are each row's pending token — sampled by
   the last step, not yet returned, not yet in the KV; ``tokens[i]`` lists exactly the tokens in row
   ``i``'s KV; ``_num_tokens[i]`` counts the tokens returned; ``_matchers[i].advance(t)`` is the stop
   check; ``_token_context[i]`` (a ``TokenBuffer``) is the processors' context, advanced with the fed
   tokens only for rows that have processors; ``samplers`` / ``logits_processors`` per row;
4. a finished row is reported with ``extract_cache(i)`` and ``tokens[i]`` and removed by
   ``filter(keep)``; ``BatchGenerator._unprocessed_sequences``, ``_currently_processing`` and
   ``_prompt_batch`` (always present, empty when idle) hold rows not yet in the batch.

MLX thread only.
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


# -- a drafting round on the running batch (facts 3 and 4) -------------------------------------------
def generation_batch(bg):
    """The running ``GenerationBatch`` (None: nothing decoding, or another mlx-lm)."""
    return getattr(bg, "_generation_batch", None)


def admitting(bg) -> bool:
    """Rows are waiting to join the batch (its next ``next()`` admits them)."""
    prompt_batch = getattr(bg, "_prompt_batch", None)
    return (bool(getattr(bg, "_unprocessed_sequences", None)) or bool(getattr(bg, "_currently_processing", None))
            or (prompt_batch is not None and len(prompt_batch) > 0))


def pending_tokens(gb) -> list[int]:
    return [int(t) for t in gb._next_tokens.tolist()]


def pending_logprobs(gb) -> list:
    return list(gb._next_logprobs)


def emitted(gb, i: int) -> int:
    return gb._num_tokens[i]


def sampler(gb, i: int):
    return (gb.samplers[i] if gb.samplers else None) or gb.fallback_sampler


def processors(gb, i: int) -> list:
    return list(gb.logits_processors[i] or ()) if gb.logits_processors else []


def advance(gb, tokens: list[list[int]], logprobs: list[list], pending: list[int], pending_lps: list) -> list:
    """Each row emitted ``tokens[i]`` (now in its KV) and has ``pending[i]`` next: advance the batch's
    bookkeeping as ``next()`` would over the same tokens; return its ``Response``s (several per row,
    in row order) and filter out the rows that finished (a stop match or the token budget — at the
    token where ``next()`` would have finished them)."""
    import mlx.core as mx

    responses, keep = [], []
    for i, uid in enumerate(list(gb.uids)):
        row = tokens[i]
        gb.tokens[i].extend(row)
        if gb.logits_processors and gb.logits_processors[i]:
            gb._token_context[i].update_and_fetch(mx.array(row, dtype=mx.int32))
        finished = False
        for t, lp in zip(row, logprobs[i]):
            gb._num_tokens[i] += 1
            reason = "length" if gb._num_tokens[i] >= gb.max_tokens[i] else None
            if gb._matchers[i].advance(t):
                reason = "stop"
            if reason is not None:
                responses.append(gb.Response(uid=uid, token=t, logprobs=lp, finish_reason=reason,
                                             prompt_cache=gb.extract_cache(i), all_tokens=gb.tokens[i]))
                finished = True
                break
            responses.append(gb.Response(uid=uid, token=t, logprobs=lp, finish_reason=None,
                                         prompt_cache=None, all_tokens=None))
        if not finished:
            keep.append(i)
    gb._current_tokens = mx.array([r[-1] for r in tokens], dtype=mx.int32)
    gb._current_logprobs = [lp[-1] for lp in logprobs]
    gb._next_tokens = mx.array(pending, dtype=mx.int32)
    gb._next_logprobs = list(pending_lps)
    if len(keep) < len(gb.uids):
        gb.filter(keep)
    return responses

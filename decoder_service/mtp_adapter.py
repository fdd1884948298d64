"""The one place the decoder leans on mlx-vlm's MTP drafting beyond its public API.

Why: Gemma 4's "assistant" drafters (``gemma4_assistant`` / ``gemma4_unified_assistant``) have no
KV cache of their own: they read the target's last sliding and last full-attention layers' K/V and
its last hidden state, and mlx-vlm exposes that only through its own round loop, which is not
continuous batching (``speculative_decoding.py`` says why we run our own).  So the decoder calls
the drafter and the target's speculative hooks directly — facts about mlx-vlm 0.7 (the minor
version ``pyproject.toml`` pins; ``tests/unit/test_mtp_adapter.py`` checks each one and fails loudly
if an upgrade changes them):

1. ``load_drafter(path)`` returns ``(model, "mtp")`` for these model types; the model has
   ``bind(target)``, ``set_shared_kv(kv, kv_offset, position=, kv_valid_len=)`` and
   ``draft_block(bonus, hidden, None, block_size, sampler, greedy=)`` → ``[B, block_size - 1]``;
2. the target LM takes ``return_hidden=True, return_shared_kv=True`` and returns the last decoder
   layer's output before the final norm (``hidden_states[-1]``) and ``{layer_type: (K, V)}`` of the
   layers the drafter reads (``shared_kv_states``); ``speculative_draft_hidden`` normalises it;
3. a multi-token forward on a ``BatchRotatingKVCache`` whose ring has wrapped (``rotated``) is
   masked one position off for left-padded rows (``make_mask`` computes the trim from the ring
   index, ``_update_concat`` from the temporal length): ``unrotate`` puts such caches in temporal
   order first — the same reordering ``_update_concat`` makes itself — after which both agree
   (``tests/rpc/test_batch_drafting.py`` shows the difference and the fix);
4. ``BufferedRotatingKVCache.from_cache`` turns a sliding-window cache into one that can be trimmed
   back over a rejected draft block even after the window has wrapped (``trim`` is exact within
   its buffer), as mlx-vlm's own round loop does;
5. ``start_speculative_cache(caches, T)`` / ``.commit(retained)`` keep exactly ``retained[i]`` of the
   ``T`` positions a batch forward appended to row ``i`` (batch append caches roll the rest into left
   padding; batch sliding windows are restored and replay what is kept).

MLX thread only.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

TESTED_MINOR = "0.7"  # mlx-vlm's minor version these facts were checked on
DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
# Slack a sliding-window cache keeps beyond its window, so a rejected block can be trimmed off
# (mlx-vlm's round loop sizes it the same way: 8 blocks, 32..128 positions).
ROLLBACK_BUFFER = 64


def load(path: Path):
    """(drafter model, its config) — loaded through mlx-vlm, weights evaluated."""
    from mlx_vlm.speculative.drafters import load_drafter

    model, kind = load_drafter(str(path))
    if kind != "mtp":
        raise ValueError(f"{path}: a {kind!r} drafter; the decoder drafts with Gemma 4 MTP assistants only")
    mx.eval(model.parameters())
    return model, model.config


def bind(drafter, lm) -> None:
    """Point the drafter at the target's input embeddings and layer types (fact 1)."""
    drafter.bind(lm)


def forward(lm, inputs: mx.array, cache: list):
    """One target forward returning ``(logits [B, T, V], hidden [B, T, H] before the final norm,
    shared K/V)`` (fact 2)."""
    out = lm(inputs, cache=cache, return_hidden=True, return_shared_kv=True)
    return out.logits, out.hidden_states[-1], out.shared_kv_states


def draft_hidden(lm, hidden: mx.array) -> mx.array:
    """The hidden state the drafter expects (the target's final norm applied)."""
    return lm.speculative_draft_hidden(hidden)


def draft(drafter, bonus: int, hidden: mx.array, shared_kv: dict, kv_len: int, k: int) -> mx.array:
    """``k`` greedy draft tokens ``[1, k]`` after ``bonus`` (the token the target sampled last, not
    yet in its cache, which holds ``kv_len`` positions); ``hidden`` [1, 1, H] normalised."""
    drafter.set_shared_kv(shared_kv, kv_len, position=max(kv_len - 1, 0), kv_valid_len=kv_len)
    return drafter.draft_block(bonus, hidden, None, k + 1, _argmax, greedy=True)


def draft_rows(drafter, bonus: list[int], hidden: mx.array, shared_kv: dict, kv_lens: list[int], k: int) -> mx.array:
    """``draft`` for several rows at once: ``shared_kv`` rows right-padded to one length, row ``i``
    valid over its first ``kv_lens[i]`` positions (and drafting at position ``kv_lens[i] - 1``)."""
    valid = mx.array(kv_lens, dtype=mx.int32)
    drafter.set_shared_kv(shared_kv, max(kv_lens), position=mx.maximum(valid - 1, 0), kv_valid_len=valid)
    return drafter.draft_block(mx.array(bonus, dtype=mx.int32), hidden, None, k + 1, _argmax, greedy=True)


def _argmax(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def drop_rejected(shared_kv: dict, rejected: int) -> dict:
    """The verify forward's shared K/V without its last ``rejected`` positions."""
    if rejected <= 0:
        return shared_kv
    out = {}
    for name, (k, v) in shared_kv.items():
        keep = max(1, k.shape[-2] - rejected)
        out[name] = (k[..., :keep, :], v[..., :keep, :])
    return out


def unrotate(caches: list) -> None:
    """Put wrapped batch sliding-window caches in temporal order before a multi-token forward (fact 3)."""
    from mlx_vlm.models.cache import BatchRotatingKVCache

    for c in caches:
        if isinstance(c, BatchRotatingKVCache) and c.keys is not None and c.rotated:
            c._temporal_order()


def rollback_ready(cache: list) -> list:
    """``cache`` with every sliding-window layer made trimmable across its window (fact 4)."""
    from mlx_vlm.models.cache import BufferedRotatingKVCache, RotatingKVCache

    out = []
    for c in cache:
        if isinstance(c, RotatingKVCache) and not isinstance(c, BufferedRotatingKVCache) and c.keep == 0:
            c = BufferedRotatingKVCache.from_cache(c, buffer_size=ROLLBACK_BUFFER)
        out.append(c)
    return out


def plain(cache: list) -> list:
    """``cache`` with buffered sliding-window layers turned back into mlx-vlm's plain rotating
    caches (the batch's ``merge`` and the prefix cache read those): the last ``max_size``
    positions, in order."""
    from mlx_vlm.models.cache import BufferedRotatingKVCache, RotatingKVCache

    out = []
    for c in cache:
        if isinstance(c, BufferedRotatingKVCache):
            r = RotatingKVCache(c.max_size, c.keep)
            r.offset = int(c.offset)
            if c.keys is not None and c._idx > 0:
                n = min(c._idx, c.max_size)
                r.keys = c.keys[..., c._idx - n: c._idx, :]
                r.values = c.values[..., c._idx - n: c._idx, :]
                r._idx = n
            c = r
        out.append(c)
    return out


def trim(cache: list, n: int) -> None:
    """Drop the last ``n`` positions of every layer (a rejected draft tail)."""
    if n > 0:
        for c in cache:
            c.trim(n)

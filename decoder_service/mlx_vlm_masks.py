"""The one place the decoder leans on mlx-vlm's Gemma 4 text model beyond its public call: image-block
attention masks for a prompt chunk that starts at a non-zero cache offset.

Why: a media prompt prefilled in chunks while others decode (``media_prefill``) must still attend
bidirectionally inside each image block on the checkpoints that do (26B-A4B, 31B:
``text_config.use_bidirectional_attention == "vision"``), or its KV and first token differ from the
whole-prompt prefill.  mlx-vlm applies that block overlay only when the mask is square (no cache
offset), and its ``mask=`` argument gives every layer the same mask, where sliding-window and full
layers need different ones (their caches return different key lengths).  So for one such chunk we let
mlx-vlm build its own per-layer masks (causal, the window on sliding layers, the offset) and add the
overlay — same block, over the chunk's queries vs the chunk's own keys.  The scheduler never splits an
image block across chunks, so every block lies inside one chunk and the overlay is exact.

It rests on three facts about mlx-vlm 0.7 (``TESTED_MINOR``; ``tests/rpc/test_mlx_vlm_masks.py`` checks
each and fails by name if an upgrade changes one):

1. ``Gemma4TextModel.__call__`` builds its per-layer masks by calling ``self._make_masks(h, cache,
   mm_token_type_ids)`` when no ``mask`` is passed — so an instance attribute of that name, set for
   one call, is used in its place;
2. for a chunk of N > 1 tokens with image tokens on a bidirectional checkpoint, ``_make_masks`` returns
   one boolean array per layer, ``[..., N, K]``, whose last N keys are the chunk's own tokens
   (``KVCache``: every earlier token before them; ``RotatingKVCache``: up to window - 1 of them);
3. a block is a contiguous run of image (1) or video (2) token types (``_block_sequence_ids_for_mask``):
   ``block_spans`` finds the same runs.

Thread ownership: the decoder's MLX thread only — the override lives for one model call, made on the
thread that sets it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

TESTED_MINOR = "0.7"  # mlx-vlm's minor version these facts were checked on
VISUAL_TYPES = (1, 2)  # mm_token_type_ids of image and video tokens (audio, 3, stays causal)


def block_spans(types: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of every bidirectional block in a prompt's token types (fact 3)."""
    vis = np.isin(np.asarray(types).reshape(-1), VISUAL_TYPES).astype(np.int8)
    edges = np.diff(np.concatenate([[0], vis, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _same_block(types: mx.array) -> mx.array:
    """``[B, 1, N, N]``: query and key are in the same block of this chunk."""
    vis = (types == VISUAL_TYPES[0]) | (types == VISUAL_TYPES[1])
    prev = mx.concatenate([mx.zeros_like(vis[:, :1]), vis[:, :-1]], axis=1)
    ids = mx.cumsum((vis & ~prev).astype(mx.int32), axis=1)
    ids = mx.where(vis, ids, 0)
    return ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] > 0))[:, None]


def _overlaid(mask, same: mx.array) -> mx.array:
    """``mask`` (the chunk's queries vs every key the layer sees) with ``same`` over its last N keys."""
    n = same.shape[-1]
    if not (isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim >= 2
            and mask.shape[-2] == n and mask.shape[-1] >= n):
        raise RuntimeError(
            f"mlx-vlm's Gemma4TextModel._make_masks gave {getattr(mask, 'shape', mask)!r} "
            f"({getattr(mask, 'dtype', type(mask))}) for a {n}-token bidirectional chunk, not a boolean "
            f"[..., {n}, K >= {n}] array: decoder_service/mlx_vlm_masks.py fact 2 no longer holds")
    pad = mx.zeros((*same.shape[:-1], mask.shape[-1] - n), dtype=mx.bool_)
    return mask | mx.concatenate([pad, same], axis=-1)


@contextmanager
def block_overlay(inner, types: mx.array) -> Iterator[None]:
    """Within this block, ``inner`` (a ``Gemma4TextModel``) masks each layer as mlx-vlm would, plus
    bidirectional attention inside every image block of the chunk whose token types are ``types``
    (``[B, N]``).  For a chunk whose blocks all lie inside it, at any cache offset."""
    original = inner._make_masks  # the class's bound method (fact 1)
    same = _same_block(types)

    def masks(h, cache, mm_token_type_ids=None):
        base = original(h, cache, mm_token_type_ids)
        done: dict[int, mx.array] = {}  # mlx-vlm shares one mask between the layers of a type
        for m in base:
            if id(m) not in done:
                done[id(m)] = _overlaid(m, same)
        return [done[id(m)] for m in base]

    inner._make_masks = masks
    try:
        yield
    finally:
        del inner._make_masks

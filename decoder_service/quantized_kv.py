"""A quantized KV cache for the running batch (``--kv-bits 4|8``): the one place the decoder
extends mlx-vlm's quantized cache classes so that mlx-lm's batch can hold them.

Why: a long conversation's KV — what grows with it — is its full-attention layers' (sliding-window
layers are bounded by the window).  mlx-vlm has both halves of a quantized batch cache
(``QuantizedKVCache`` for one sequence, ``BatchQuantizedKVCache`` with extend / filter / extract /
trim) and its attention reads them (``quantized_scaled_dot_product_attention``), but mlx-lm's
``BatchGenerator`` joins sequences with ``cache.merge`` and masks with ``cache.make_mask``, which
neither has.  ``RowQuantizedKV.merge`` and ``BatchQuantizedKV.make_mask`` / ``extract`` add them,
mirroring ``BatchKVCache`` (left padding, right-aligned rows); ``tests/rpc/test_quantized_batch.py``
checks them against mlx-vlm (and fails loudly if an upgrade changes the classes).

Which layers: full-attention layers whose K/V nothing else reads.  On E2B / E4B the last
non-shared layer of each type is read by the KV-shared layers after it, and an MTP drafter reads
the last full-attention layer: both receive whatever the layer's cache returns, and a quantized
tuple is not what they take — those layers stay full precision (``quantizable_layers``).

MLX thread only.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_vlm.models.cache import BatchKVCache, BatchQuantizedKVCache, KVCache, QuantizedKVCache


def quantizable_layers(lm, *, drafter: bool) -> frozenset[int]:
    """Indexes of the LM's layers whose running KV may be quantized."""
    inner = lm.model
    types = [layer.layer_type for layer in inner.layers]
    read_by_others = {src for i, src in enumerate(inner.previous_kvs) if src != i}
    if drafter:  # the drafter reads the last layer of each type (mlx-vlm's shared_kv_sink)
        read_by_others |= {max(i for i, t in enumerate(types) if t == kind) for kind in set(types)}
    return frozenset(i for i, t in enumerate(types) if t == "full_attention" and i not in read_by_others)


def _group(dim: int) -> int | None:
    return 64 if dim % 64 == 0 else 32 if dim % 32 == 0 else None


def quantize(cache: list, layers: frozenset[int], bits: int) -> list:
    """``cache`` (one sequence's) with the plain KV of ``layers`` as ``RowQuantizedKV``."""
    out = []
    for i, c in enumerate(cache):
        if i in layers and type(c) is KVCache and c.keys is not None:
            dim = min(c.keys.shape[-1], c.values.shape[-1])
            group = _group(dim)
            if group is not None:
                q = c.to_quantized(group_size=group, bits=bits)
                q.__class__ = RowQuantizedKV
                c = q
        elif i in layers and type(c) is QuantizedKVCache:
            c.__class__ = RowQuantizedKV
        out.append(c)
    return out


class RowQuantizedKV(QuantizedKVCache):
    """One sequence's quantized KV that mlx-lm's batch can merge with others."""

    def size(self) -> int:
        return int(self.offset)

    def merge(self, caches: list) -> BatchQuantizedKV:
        """Right-align the rows under left padding, as ``BatchKVCache.merge`` does."""
        lengths = [c.size() for c in caches]
        width = max(lengths)
        ref = next((c for c in caches if c.keys is not None), None)
        if width == 0 or ref is None:
            return BatchQuantizedKV([0] * len(caches), group_size=self.group_size, bits=self.bits)
        pad = [width - n for n in lengths]
        B = len(caches)

        def stacked(parts_of) -> tuple:
            out = []
            for j, part in enumerate(parts_of(ref)):
                buf = mx.zeros((B, part.shape[1], width, part.shape[-1]), dtype=part.dtype)
                for i, (p, c) in enumerate(zip(pad, caches)):
                    if c.keys is not None and lengths[i]:
                        buf[i: i + 1, :, p: p + lengths[i]] = parts_of(c)[j][..., : lengths[i], :]
                out.append(buf)
            return tuple(out)

        batch = BatchQuantizedKV(pad, group_size=ref.group_size, bits=ref.bits)
        batch.keys = stacked(lambda c: c.keys)
        batch.values = stacked(lambda c: c.values)
        batch.offset = batch.offset + width
        batch._idx = width
        return batch


class BatchQuantizedKV(BatchQuantizedKVCache):
    """mlx-vlm's quantized batch cache with what mlx-lm's batch also calls on a cache."""

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return BatchKVCache.make_mask(self, N, return_array=return_array, **kwargs)

    def size(self) -> int:
        return self._idx

    def extract(self, idx: int) -> RowQuantizedKV:
        row = super().extract(idx)
        row.__class__ = RowQuantizedKV
        return row

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in (*self.keys, *self.values))

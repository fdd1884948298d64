"""Media-aware prefix cache: KV state reused across turns and requests, never across images.

Why: turn 2 of a conversation repeats turn 1 (system prompt, images, the
reply); recomputing it dominates time to first token.  We reuse mlx-lm's
``LRUPromptCache`` (a trie of token sequences, LRU bounded by bytes, nearest
prefix lookup, trimming where the cache allows it) but key it on *keyed
tokens*: text positions are their token ids, placeholder positions are
``(media_key, row)`` where ``media_key`` is a digest of the embedding bytes the
decoder actually received.  Two prompts with the same placeholder ids but
different images therefore share nothing past the image's first row — even
if a caller sent the same ``content_hash`` for both, because the key is
computed here, from the rows, not taken on trust.

A lookup never ends inside a media block (bidirectional image attention
needs the whole block computed together) and always leaves at least the
last prompt token to compute, whose logits give the first sample.

``kv_bits`` (``--kv-bits 4|8``): entries are stored as mlx-lm's
``QuantizedKVCache`` (``KVCache.to_quantized``, group 64, or 32 where a head
is narrower), so the conversations waiting for their next turn — what grows
with their length — take ~0.28x (4 bits) of their bf16 bytes, and the same
byte bound keeps ~3.5x more of them.  A hit is dequantized back to a plain
``KVCache`` for the prefill that continues it; the scheduler quantizes the layers it
may again when the sequence starts decoding (``quantized_kv``: the running batch and a
sequence decoding alone hold their full-attention KV quantized too), and entries stored
from them stay as they are.  Sliding-window layers are kept as they are (mlx-lm cannot
quantize a ``RotatingKVCache``; they are bounded by the window anyway).

**Where the next turn departs** (``store_point``): a chat template renders a generation prompt
that the same turn, once answered, does not repeat in the history (Gemma 4's E-series and 31B
templates end it with an empty thought block, ``<|channel>thought\n<channel|>``), so turn 2
departs from turn 1's stored entry a few tokens before the end of turn 1's prompt.  A full-attention
layer trims back over that; a sliding-window layer whose ring has wrapped cannot (mlx-lm:
``RotatingKVCache.is_trimmable`` is ``offset < max_size``), and on real checkpoints (windows of
512-1,024 tokens) every conversation with a system prompt and tools wraps — turn 2 reused nothing.
So the caller says where the next turn departs (``GenerateSetup.cache_point``: the gateway renders
the conversation with the answer in it and finds where it parts from the prompt), and when the
prompt is prefilled an entry ending there is stored too.  It costs no extra compute: a
multi-token prefill chunk leaves a sliding window holding ``window - 1 + chunk`` positions
(mlx-lm's ``_update_concat`` keeps a full window for every token of the chunk), so when the
prefill's last chunk starts at or before the point, the window as it was at the point is still
there and ``rewound`` cuts it out (the prefills end a chunk at the point for this).  Two entries
per conversation then (the point, and prompt + reply as before); the full-attention prefix is held
by both — the price of turn 2 hitting on every layer type, bounded by the same byte bound.

Thread ownership: MLX thread only (the scheduler's).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

_MODEL = "lm"
# What LRUPromptCache keeps per cached token besides the KV arrays: a trie node (a dict) and the
# token list in its LRU queue.  Measured ~255 B/token (tests/unit/test_prefix_cache_bound.py);
# as much as the KV itself on the tiny checkpoint, ~1-3 % on real ones.
TRIE_BYTES_PER_TOKEN = 256


def media_key(data, dtype: str) -> str:
    """Digest of one span's embedding bytes (~1 ms per MB)."""
    h = hashlib.blake2b(dtype.encode() + b"|", digest_size=16)
    h.update(data)  # bytes or a receive buffer, hashed in place (no joined copy)
    return h.hexdigest()


def keyed_tokens(ids: Sequence[int], spans: Sequence[tuple[int, int, str]]) -> list[Any]:
    """``ids`` with each span position ``offset + j`` replaced by ``(media_key, j)``."""
    kids: list[Any] = list(ids)
    for offset, length, key in spans:
        for j in range(length):
            kids[offset + j] = (key, j)
    return kids


def _compact(c: Any) -> None:
    """Give ``c`` its own buffers holding only the filled positions.

    A KV cache grows its buffers in 256-token steps (a 40-token prompt holds a
    256-token buffer) and a cache extracted from a batch may be a view of the
    batch's buffer; ``KVCache.nbytes`` counts the whole buffer, so compacting
    fits several times more entries in the same bound.  Rotating caches are
    sliced only before they wrap (``_idx == offset``: positions are in order).
    """
    keys, values = getattr(c, "keys", None), getattr(c, "values", None)
    if not (isinstance(keys, mx.array) and isinstance(values, mx.array)) or keys.ndim != 4:
        return
    used = getattr(c, "offset", keys.shape[2])
    if hasattr(c, "_idx") and c._idx != used:
        used = keys.shape[2]
    used = min(used, keys.shape[2])
    c.keys = mx.contiguous(keys[..., :used, :])
    c.values = mx.contiguous(values[..., :used, :])


def _quantized(c, bits: int):
    """A full-attention layer's compact KV as a ``QuantizedKVCache`` (others as they are).

    By class name: the caches are mlx-vlm's (``gemma4.make_cache``), built like mlx-lm's."""
    if type(c).__name__ != "KVCache" or not hasattr(c, "to_quantized") or c.keys is None:
        return c
    dim = min(c.keys.shape[-1], c.values.shape[-1])
    group = 64 if dim % 64 == 0 else 32 if dim % 32 == 0 else None
    return c.to_quantized(group_size=group, bits=bits) if group else c


def _dequantized(c):
    """A stored ``QuantizedKVCache`` (stored so, or quantized while it decoded:
    ``quantized_kv.RowQuantizedKV``) back as the plain ``KVCache`` a prefill computes on."""
    from mlx_vlm.models.cache import (
        KVCache,  # the class the Gemma 4 LM's make_cache builds
        QuantizedKVCache,
    )

    if not isinstance(c, QuantizedKVCache) or c.keys is None:
        return c
    plain = KVCache()
    n = c.offset
    plain.keys = mx.dequantize(*c.keys, group_size=c.group_size, bits=c.bits)[..., :n, :]
    plain.values = mx.dequantize(*c.values, group_size=c.group_size, bits=c.bits)[..., :n, :]
    plain.offset = n
    return plain


def rewound(cache: list[Any], n: int) -> list[Any] | None:
    """A copy of ``cache`` holding its first ``offset - n`` positions, or None where a layer no longer
    holds what it needs for that: a full-attention layer is cut; a sliding window must still hold
    the ``window - 1`` positions before the new end (or all of them, short of a window) — true right
    after a prefill whose last chunk began at or before the new end.  ``cache`` is not changed."""
    out = []
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if not (isinstance(keys, mx.array) and isinstance(values, mx.array)) or keys.ndim != 4:
            return None
        name = type(c).__name__
        new = copy.copy(c)
        end = c.offset - n
        if end <= 0:
            return None
        if name == "KVCache":
            new.keys, new.values = keys[..., :end, :], values[..., :end, :]
        elif name == "RotatingKVCache":
            held = keys.shape[2]
            if c._idx != held or held > c.offset:  # not in temporal order (a decode step rotated it)
                return None
            kept = held - n
            if kept < min(end, c.max_size - 1) or kept <= 0:
                return None
            new.keys, new.values = keys[..., :kept, :], values[..., :kept, :]
            new._idx = kept
        else:
            return None
        new.offset = end
        out.append(new)
    return out


class PrefixCache:
    def __init__(self, max_bytes: int, kv_bits: int | None = None) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.kv_bits = kv_bits
        self.max_bytes = max_bytes
        self.kv_bytes = 0  # KV arrays alone; with ``tokens``, kept by ``store`` for the metrics thread
        self.tokens = 0
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=max_bytes) if max_bytes > 0 else None
        self._nbytes = 0

    @property
    def enabled(self) -> bool:
        return self._lru is not None

    @property
    def nbytes(self) -> int:
        """KV bytes plus the trie's per-token cost: what the ``max_bytes`` bound applies to.

        A number kept by ``store`` (MLX thread), so the metrics thread can read it
        without walking structures the MLX thread is changing."""
        return self._nbytes

    def _measure(self) -> int:
        if self._lru is None:
            return 0
        self.kv_bytes, self.tokens = self._lru.nbytes, self._cached_tokens()
        return self.kv_bytes + TRIE_BYTES_PER_TOKEN * self.tokens

    def _cached_tokens(self) -> int:
        # mlx-lm bounds KV bytes only; its entry queue is internal, hence the guarded reach
        # (the bound test fails if a new mlx-lm moves it).
        queues = getattr(getattr(self._lru, "_lru", None), "_lrus", None)
        if not isinstance(queues, dict):
            return 0
        return sum(len(tokens) for q in queues.values() for _, tokens in q)

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    def lookup(self, kids: list[Any], spans: Sequence[tuple[int, int, str]]) -> tuple[list[Any] | None, int]:
        """``(cache copy, tokens it covers)`` for the longest reusable prefix of ``kids``.

        At most ``len(kids) - 1`` tokens: the last one is always computed, its
        logits give the first sample."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if self._lru is None or len(kids) < 2:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_MODEL, kids)
        n = len(kids) - len(rest)
        if cache is not None and n == len(kids):  # exact: give back the last token
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                n -= 1
            else:
                cache, rest = self._lru.fetch_nearest_cache(_MODEL, kids[:-1])
                n = len(kids) - 1 - len(rest)
        if cache is None or n <= 0:
            return None, 0
        for offset, length, _ in spans:  # never stop inside a media block
            if offset < n < offset + length:
                cache, n = self._trimmed(cache, n, offset)
                break
        if cache is not None:  # the prefill computes on full precision (quantized again to decode)
            cache = [_dequantized(c) for c in cache]
        return (cache, n) if cache is not None else (None, 0)

    @staticmethod
    def _trimmed(cache: list[Any], have: int, want: int) -> tuple[list[Any] | None, int]:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if want <= 0 or not can_trim_prompt_cache(cache):
            return None, 0
        trim_prompt_cache(cache, have - want)
        return cache, want

    def store_point(self, kids: list[Any], cache: list[Any], filled: int, point: int) -> bool:
        """Store an entry for ``kids[:point]`` cut out of ``cache`` (which holds ``kids[:filled]``),
        where the conversation's next turn departs; False where the cache cannot give it."""
        if self._lru is None or not 0 < point <= filled:
            return False
        cut = rewound(cache, filled - point) if point < filled else [copy.copy(c) for c in cache]
        if cut is None:
            return False
        self.store(kids[:point], cut)
        return True

    def store(self, kids: list[Any], cache: list[Any]) -> None:
        """Keep ``cache`` (which holds exactly ``kids``) for later prefixes.

        The arrays are materialized into compact buffers first: a cache
        extracted from the batch is a lazy slice of the *whole* batch's KV
        buffer (and a prefill cache a view into a buffer allocated in 256-token
        steps); kept as is, each entry pins the batch's buffers and graph —
        measured: 32 MB of MLX memory for 1.7 MB of accounted KV — so the byte
        bound would not bound anything."""
        if self._lru is None or not kids or not cache:
            return
        for c in cache:
            _compact(c)
        if self.kv_bits:
            cache = [_quantized(c, self.kv_bits) for c in cache]
        mx.eval([[c.keys, c.values] for c in cache if getattr(c, "keys", None) is not None])
        self._lru.insert_cache(_MODEL, list(kids), cache)
        self._nbytes = self._measure()
        while len(self._lru) > 1 and self._nbytes > self.max_bytes:  # oldest first, as mlx-lm evicts
            self._lru.trim_to(n_sequences=len(self._lru) - 1)
            self._nbytes = self._measure()

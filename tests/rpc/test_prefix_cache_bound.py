"""The prefix cache's byte bound bounds memory, not just KV bytes.

mlx-lm's ``LRUPromptCache`` counts KV arrays; its trie costs a dict per cached
token on top (as much as the KV on a tiny model), which a soak showed as
decoder RSS climbing ~2x the configured bound.  ``PrefixCache`` counts both.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tracemalloc

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from decoder_service.prefix_cache import TRIE_BYTES_PER_TOKEN, PrefixCache, keyed_tokens


def _entry(n_tokens: int, layers: int = 4, head_dim: int = 16) -> list[KVCache]:
    cache = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 1, n_tokens, head_dim), mx.bfloat16),
                           mx.zeros((1, 1, n_tokens, head_dim), mx.bfloat16))
        cache.append(c)
    return cache


def _measure(bound: int = 4 << 20) -> dict:
    """Fill a cache with ~4x the bound's worth of prompts; what it holds, by tracemalloc and MLX."""
    pc = PrefixCache(bound)
    rng = random.Random(0)
    mx.eval(mx.zeros(1))
    active0 = mx.get_active_memory()
    tracemalloc.start()
    try:
        py0, _ = tracemalloc.get_traced_memory()
        for n in range(600):
            # 256 tokens: 8 KiB arrays, no allocator rounding (MLX rounds a 6.4 KB array up to 8 KiB)
            ids = [rng.randrange(100_000) for _ in range(256)]
            pc.store(keyed_tokens(ids, [(5, 16, f"{n:032x}")]), _entry(256))
            assert pc.nbytes <= bound
        py, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"bound": bound, "entries": len(pc), "python": py - py0, "mlx": mx.get_active_memory() - active0}


def test_python_and_mlx_memory_stay_within_the_bound():
    # in a fresh interpreter: other tests' engines and threads allocate in this one meanwhile
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert 20 < m["entries"] < 600  # it evicted, and kept a useful number
    # the bound covers what the cache really holds (10 % slack for objects around the arrays)
    assert m["python"] + m["mlx"] <= m["bound"] * 1.10, m
    # the per-token constant is an honest estimate of the trie's cost (within a factor of 1.5)
    per_token = m["python"] / (m["entries"] * 256)
    assert TRIE_BYTES_PER_TOKEN / 1.5 <= per_token <= TRIE_BYTES_PER_TOKEN * 1.5, per_token


def test_a_lone_entry_larger_than_the_bound_is_not_kept_forever():
    pc = PrefixCache(64 << 10)
    pc.store(keyed_tokens(list(range(1000)), []), _entry(1000))
    pc.store(keyed_tokens(list(range(5000, 5010)), []), _entry(10))
    assert len(pc) == 1 and pc.nbytes <= 64 << 10


if __name__ == "__main__":
    print(json.dumps(_measure()))

"""Where each recent conversation lives: the decoder its turns go to, and how many each decoder holds.

Why: rendezvous hashing alone spreads conversations only as evenly as chance does — 40
conversations over two decoders landed 28 / 12 in one measured run (binomial: about 1 run in
25 is worse than 65 / 35), and the decoder with more conversations has less prefix cache for each.
Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) bounds *assigned keys*:
a new conversation takes the first decoder in its rendezvous order that holds no more than
``c`` x the mean number of conversations, so no decoder holds more than ceil(c x (n + 1) / k) of n.
Once placed, a conversation stays (its KV is there) while its decoder is healthy and within the
in-flight load bound; a conversation whose decoder has gone is placed again.

A table per gateway, bounded (``MAX_KEYS``, least recently used first) and forgetting conversations
idle for ``IDLE_S``: gateways do not share it, but each starts from the same rendezvous order, so
several gateways agree on a conversation's decoder unless one of them had to divert it.

Event-loop thread (the pool's).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict

MAX_KEYS = 65536
IDLE_S = 1800.0


class Homes:
    def __init__(self, max_keys: int = MAX_KEYS, idle_s: float = IDLE_S) -> None:
        self._lru: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # key -> (address, last used)
        self._counts: Counter[str] = Counter()
        self._max, self._idle = max_keys, idle_s

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: bytes) -> str | None:
        """The address this conversation lives on (None: new, or forgotten); marks it used."""
        self._expire()
        hit = self._lru.get(key)
        if hit is None:
            return None
        self._lru[key] = (hit[0], time.monotonic())
        self._lru.move_to_end(key)
        return hit[0]

    def place(self, key: bytes, address: str) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._counts[old[0]] -= 1
        self._lru[key] = (address, time.monotonic())
        self._counts[address] += 1
        while len(self._lru) > self._max:
            self._drop_oldest()

    def count(self, address: str) -> int:
        """Conversations living on ``address``."""
        return self._counts[address]

    def _expire(self) -> None:
        cutoff = time.monotonic() - self._idle
        while self._lru and next(iter(self._lru.values()))[1] < cutoff:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (address, _) = self._lru.popitem(last=False)
        self._counts[address] -= 1

"""Embedding cache: LRU bounded by bytes, plus a small alias table from raw upload bytes.

Why: clients resend the same image or clip turn after turn; a hit must cost
no tower work and, ideally, no decoding either.  Entries are keyed by the
*content* key (hash of the decoded media, the preprocessing parameters, the
checkpoint's weights and the output dtype), so the same picture sent as two
different files still hits.  The alias table maps a hash of the raw upload
bytes (+ parameters) to its content key, so a byte-identical resend skips
decoding as well.

Thread ownership: event-loop thread only (no locking needed).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mmserve_core.wire import types as T


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EmbeddingCache:
    def __init__(self, max_bytes: int, max_aliases: int = 65536) -> None:
        self.max_bytes = max_bytes
        self.max_aliases = max_aliases
        self._items: OrderedDict[str, T.EncodedItem] = OrderedDict()
        self._aliases: OrderedDict[str, str] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> T.EncodedItem | None:
        item = self._items.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return item

    def resolve_alias(self, raw_key: str) -> str | None:
        """Content key previously seen for these raw bytes, if its entry is still cached."""
        key = self._aliases.get(raw_key)
        if key is None or key not in self._items:
            return None
        self._aliases.move_to_end(raw_key)
        return key

    def put(self, key: str, item: T.EncodedItem, raw_key: str | None = None) -> None:
        if not self.enabled:
            return
        size = item.tensor.nbytes
        if size > self.max_bytes:
            return  # larger than the whole cache: never evict everything for one item
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.tensor.nbytes
        self._items[key] = item
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= evicted.tensor.nbytes
            self.stats.evictions += 1
        if raw_key is not None:
            self._aliases[raw_key] = key
            self._aliases.move_to_end(raw_key)
            while len(self._aliases) > self.max_aliases:
                self._aliases.popitem(last=False)

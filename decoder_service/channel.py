"""A one-producer channel from the MLX thread to an asyncio consumer that coalesces tokens.

Why: per-token transport work (an asyncio wake-up, a gRPC message, an SSE
event in the gateway, the client's parse) costs about as much as a decode
step of a small model, and on a machine with few cores it competes with the
decode itself.  So:

* the MLX thread never waits on the consumer and wakes it at most once per
  batch: ``put`` appends under a lock and schedules a wake-up only if none is
  pending;
* ``get_batch`` drains *everything* available and merges consecutive token
  events into one (a consumer that lags gets the backlog as one message);
* token wake-ups are spaced at least ``min_interval_s`` apart (vLLM's and
  SGLang's ``stream_interval``, but in time rather than tokens, so it only
  bites when tokens come faster than a reader could ever use them: the
  first token and every token of a model slower than one per interval still
  go out at once).  Non-token items (the completion) are never held.

Thread ownership: ``put`` on the producer (MLX) thread; ``get_batch``,
``drain`` and ``wake`` on the event-loop thread that created the channel.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from mmserve_core.wire import types as T


class TokenChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop, min_interval_s: float = 0.0) -> None:
        self._loop = loop
        self._min_interval = min_interval_s
        self._lock = threading.Lock()
        self._items: deque[object] = deque()
        self._wake_pending = False
        self._last_flush = -1e9
        self._ready = asyncio.Event()

    # -- producer thread ------------------------------------------------------
    def put(self, item: object) -> None:
        is_token = isinstance(item, T.TokenEvent)
        with self._lock:
            self._items.append(item)
            if self._wake_pending and is_token:
                return
            self._wake_pending = True
            due = self._last_flush + self._min_interval if is_token else 0.0
        self._loop.call_soon_threadsafe(self._arm, due)

    # -- event-loop thread --------------------------------------------------------
    def _arm(self, due: float) -> None:
        delay = due - time.monotonic()
        if delay <= 0:
            self._ready.set()
        else:
            self._loop.call_later(delay, self._ready.set)

    def wake(self, *_: object) -> None:
        """Make a pending ``get_batch`` return (possibly empty), e.g. when the
        producer's job ended without sending a final item."""
        self._ready.set()

    async def get_batch(self) -> list[object]:
        """Wait for an item (or a ``wake``); return all available, token events merged."""
        await self._ready.wait()
        return self.drain()

    def drain(self) -> list[object]:
        """Return whatever is available now, without waiting."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._wake_pending = False
            self._ready.clear()
            if items:
                self._last_flush = time.monotonic()
        return _coalesce(items)


def _coalesce(items: list[object]) -> list[object]:
    out: list[object] = []
    for it in items:
        if isinstance(it, T.TokenEvent) and out and isinstance(out[-1], T.TokenEvent):
            prev = out[-1]
            lps = None if prev.logprobs is None and it.logprobs is None else (
                (prev.logprobs or []) + (it.logprobs or []))
            out[-1] = T.TokenEvent(prev.token_ids + it.token_ids, prev.text + it.text, lps)
        else:
            out.append(it)
    return out

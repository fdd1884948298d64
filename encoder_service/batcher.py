"""Batches tower work across items and requests on the encoder's one MLX thread.

Why: a tower forward pass over B same-shape inputs costs far less than B
passes on a GPU (and never more on a CPU), and concurrent callers rarely
arrive at the same instant.  So work is not batched by waiting: while the MLX
thread runs one batch, everything that arrives queues up and becomes the
next batch (the way continuous batching fills decode steps).  Tasks are
grouped by a shape key — images by their preprocessed pixel shape (the
vision tower only batches equal shapes), audio blocks by a 5-second length
bucket (padding is masked, but padded frames still cost compute) — and each
group is one forward pass of at most ``max_batch`` tasks.  Every task has its
own future, so a request's first item streams out while later ones compute.

Thread ownership: ``submit`` on the event-loop thread; ``_drain`` runs as a
job on the ``MLXWorker`` thread and resolves futures with
``call_soon_threadsafe``.  ``_lock`` guards ``_pending`` and ``_draining``.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmserve_core.runtime.logs import get_logger
from mmserve_core.runtime.mlx_thread import MLXWorker, set_exception, set_result
from mmserve_core.wire.errors import ResourceExhausted, ServeError

log = get_logger(__name__)


@dataclass
class TowerTask:
    """One forward-pass input: an image, or one audio block."""

    kind: str  # "image" | "audio"
    key: tuple  # tasks with equal keys may share a forward pass
    array: Any  # pixel_values [1,3,H,W] or a mono waveform
    rows: int  # soft-token rows expected back
    dtype: str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop = field(repr=False, default=None)  # type: ignore[assignment]


# run_group(towers, kind, arrays, rows, dtype) -> one result per task
GroupRunner = Callable[[Any, str, list, list[int], str], list]


class TowerBatcher:
    def __init__(
        self,
        worker: MLXWorker,
        run_group: GroupRunner,
        *,
        max_batch: int = 8,
        max_pending: int = 256,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.worker = worker
        self.run_group = run_group
        self.max_batch = max(1, max_batch)
        self.max_pending = max_pending
        self.on_batch = on_batch
        self._lock = threading.Lock()
        self._pending: deque[TowerTask] = deque()
        self._draining = False

    @property
    def depth(self) -> int:
        return len(self._pending)

    # -- event-loop thread ----------------------------------------------------------
    def submit(self, tasks: list[TowerTask]) -> None:
        """Queue tasks (all or none); their futures resolve as their batches finish."""
        loop = asyncio.get_running_loop()
        for t in tasks:
            t.loop = loop
        with self._lock:
            if len(self._pending) + len(tasks) > self.max_pending:
                raise ResourceExhausted(
                    f"encoder queue is full ({len(self._pending)} tower inputs waiting, limit "
                    f"{self.max_pending}); retry later"
                )
            self._pending.extend(tasks)
            kick = not self._draining
            self._draining = True
        if kick:
            try:
                fut = self.worker.submit(self._drain)
            except BaseException:
                with self._lock:
                    self._draining = False
                    failed = [t for t in tasks if t in self._pending]
                    for t in failed:
                        self._pending.remove(t)
                raise
            fut.add_done_callback(self._drain_done)

    def _drain_done(self, fut: asyncio.Future) -> None:
        """Event loop: the drain job died (a bug, or shutdown): fail what it left behind."""
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                left = list(self._pending)
                self._pending.clear()
                self._draining = False
            err = fut.exception() if not fut.cancelled() else RuntimeError("encoder worker stopped")
            for t in left:
                if not t.future.done():
                    t.future.set_exception(err)

    # -- MLX thread ---------------------------------------------------------------------
    def _take_group(self) -> list[TowerTask] | None:
        with self._lock:
            if not self._pending:
                self._draining = False
                return None
            key = self._pending[0].key
            group, rest = [], deque()
            while self._pending:
                t = self._pending.popleft()
                if t.key == key and len(group) < self.max_batch:
                    group.append(t)
                else:
                    rest.append(t)
            self._pending = rest
            return group

    def _drain(self, towers) -> None:
        while True:
            group = self._take_group()
            if group is None:
                return
            live = [t for t in group if not t.future.cancelled()]
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(live[0].kind, len(live))
            try:
                results = self.run_group(towers, live[0].kind, [t.array for t in live],
                                         [t.rows for t in live], live[0].dtype)
            except ServeError as e:
                for t in live:
                    t.loop.call_soon_threadsafe(set_exception, t.future, e)
                continue
            except Exception as e:  # noqa: BLE001 - a bug: every task of the group reports it
                log.error("tower batch failed", kind=live[0].kind, size=len(live),
                          traceback=traceback.format_exc())
                for t in live:
                    t.loop.call_soon_threadsafe(set_exception, t.future, e)
                continue
            for t, r in zip(live, results, strict=True):
                t.loop.call_soon_threadsafe(set_result, t.future, r)


"""Requests waiting for the decoder's MLX thread, and the bound on how many the decoder holds.

Why: admission must refuse only when the decoder is really full — ``--max-active`` sequences in
it and ``--max-queue`` more waiting — never because the MLX thread has not yet taken a burst off
a bounded queue while slots were free.  So the bound is a locked count of requests *in the
decoder* (queued, prefilling or generating), released once per request: when its completion or
error is emitted, or when it is dropped cancelled.

Waiting requests leave in priority order (``GenerationJob.priority``: OpenAI's ``service_tier``
``priority`` before ``default`` before ``flex``), first come first served within one priority —
vLLM's priority scheduling, without preemption: a running sequence keeps its slot.

Thread ownership: ``submit``, ``release``, ``depth`` and ``wake`` from any thread; ``next``
and ``waiting`` on the MLX thread only.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

from mmserve_core.wire import types as T
from mmserve_core.wire.errors import ResourceExhausted

_WAKE = object()


class RequestQueue:
    def __init__(self, max_active: int, max_queue: int) -> None:
        self.max_active = max_active
        self.max_queue = max(0, max_queue)
        self._heap: list[tuple[int, int, object]] = []  # (-priority, arrival, job): a heap under _ready
        self._ready = threading.Condition(threading.Lock())
        self._arrival = itertools.count()
        self._lock = threading.Lock()
        self._in_system = 0

    # -- any thread -------------------------------------------------------------------
    def submit(self, job) -> None:
        """Count ``job`` in (or refuse it) and queue it; its completion or error releases it."""
        with self._lock:
            if self._in_system >= self.max_active + self.max_queue:
                raise ResourceExhausted(
                    f"decoder queue is full ({self._in_system - self.max_active} requests waiting behind "
                    f"{self.max_active} generating; --max-queue {self.max_queue}); retry later")
            self._in_system += 1
            job.counted = True
        emit = job.emit

        def counted_emit(ev, _emit=emit) -> None:
            if isinstance(ev, (T.Completion, BaseException)):
                self.release(job)
            _emit(ev)

        job.emit = counted_emit
        self._push(-job.priority, job)

    def _push(self, rank: int, item) -> None:
        with self._ready:
            heapq.heappush(self._heap, (rank, next(self._arrival), item))
            self._ready.notify()

    def release(self, job) -> None:
        """``job`` left the decoder (finished, failed or cancelled): free its place, once."""
        with self._lock:
            if job.counted:
                job.counted = False
                self._in_system -= 1

    @property
    def depth(self) -> int:
        return len(self._heap)

    @property
    def load(self) -> tuple[int, int]:
        """``(requests in the decoder, how many it holds at most)``: what a Generate's response
        headers tell the gateways (``LOAD_HEADER``), so their picks see each other's traffic."""
        return self._in_system, self.max_active + self.max_queue

    def wake(self) -> None:
        """Make a blocked ``next`` return now (the scheduler is stopping)."""
        self._push(-(1 << 30), _WAKE)

    # -- MLX thread ---------------------------------------------------------------------
    def next(self, *, block: bool):
        """The next live job, or None (nothing within 0.1 s, or a wake).
        Cancelled jobs are released and skipped."""
        while True:
            job = self._pop(0.1 if block else 0.0)
            if job is None:
                return None
            if job is _WAKE:
                return None
            if job.cancel.is_set():
                self.release(job)
                continue
            return job

    def _pop(self, timeout_s: float):
        """The highest-priority, earliest waiting job, waiting up to ``timeout_s`` for one."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while not self._heap:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._ready.wait(left)
            return heapq.heappop(self._heap)[2]

    def waiting(self) -> bool:
        return bool(self._heap)

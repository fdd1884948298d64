"""The one thread per process that owns all MLX work, and its bounded queue.

Why: MLX streams are thread-local and MLX arrays must not be touched from two
threads at once, so every model load, warm-up, forward pass and ``mx.eval``
runs on this thread.  asyncio handlers only *enqueue* work and await an
``asyncio.Future`` (or read an ``asyncio.Queue``) that this thread completes
through ``loop.call_soon_threadsafe``.  A full queue is reported as
``ResourceExhausted`` immediately instead of letting latency grow unbounded.

Thread ownership: ``submit``/``stop`` are called from the event loop thread;
everything passed to ``submit`` runs on the worker thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire.errors import ResourceExhausted, ServeError, Unavailable

log = get_logger(__name__)
_STOP = object()


@dataclass
class Job:
    fn: Callable[..., Any]
    args: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    ctx: contextvars.Context
    enqueued_at: float = field(default_factory=time.perf_counter)


class MLXWorker:
    """Runs callables one at a time on a dedicated thread."""

    def __init__(self, name: str, max_queue: int = 64) -> None:
        self.name = name
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self.state: Any = None  # whatever init() returned; only touched on the worker thread

    # -- lifecycle (event-loop thread) -------------------------------------
    def start(self, init: Callable[[], Any]) -> None:
        """Start the thread and run ``init()`` on it (load + warm up the model)."""
        self._thread = threading.Thread(target=self._run, args=(init,), name=self.name, daemon=True)
        self._thread.start()

    async def wait_ready(self) -> None:
        """Wait until ``init`` finished; re-raise its error if it failed."""
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._init_error is not None:
            raise self._init_error

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- work submission (event-loop thread) -------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue ``fn(state, *args)`` for the worker; returns a future for its result."""
        if not self._ready.is_set() or self._init_error is not None:
            raise Unavailable(f"{self.name} is not ready yet")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        job = Job(fn, args, fut, loop, contextvars.copy_context())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"{self.name} queue is full ({self._queue.maxsize} requests waiting); retry later"
            ) from None
        return fut

    # -- worker thread -------------------------------------------------------
    def _run(self, init: Callable[[], Any]) -> None:
        try:
            self.state = init()
        except BaseException as e:  # noqa: BLE001 - reported to wait_ready
            log.error("worker init failed", worker=self.name, exc_info=True)
            self._init_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if job.future.cancelled():
                continue
            try:
                result = job.ctx.run(job.fn, self.state, *job.args)
            except ServeError as e:
                job.loop.call_soon_threadsafe(set_exception, job.future, e)
            except BaseException as e:  # noqa: BLE001 - bug: travels back as INTERNAL
                log.error("worker job failed", worker=self.name, traceback=traceback.format_exc())
                job.loop.call_soon_threadsafe(set_exception, job.future, e)
            else:
                job.loop.call_soon_threadsafe(set_result, job.future, result)


def set_result(fut: asyncio.Future, value: Any) -> None:
    """Event loop (via ``call_soon_threadsafe``): resolve unless the waiter already gave up."""
    if not fut.done():
        fut.set_result(value)


def set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

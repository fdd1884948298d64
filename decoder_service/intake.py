"""Reading one ``Generate`` request stream under the decoder's stream limits.

Why: a client stream is the one place a caller can hold server memory
without doing anything — a setup that declares spans and then sends
nothing, or sends slowly, or lies about its sizes.  So every stream:

- counts against ``--max-open-streams`` from its first byte, and reserves
  the bytes its setup declares against ``--max-buffered-bytes`` *before*
  any chunk is buffered (``RESOURCE_EXHAUSTED`` beyond either cap);
- ends with ``DEADLINE_EXCEEDED`` when no message arrives for
  ``--stream-idle-timeout-s`` while it is still sending, freeing what it
  buffered;
- gets the initial metadata (headers) only once its setup is accepted, so
  a client can wait for them before sending chunks: a setup that is refused
  then ends the call while nothing is in flight (grpc.aio reports a write
  that fails because the server already answered as ``INTERNAL``, hiding
  the real status — grpc/grpc#36066);
- when a chunk is wrong after acceptance, reads (and drops) the rest of
  what the client sends, up to the bytes it declared, before answering, so
  a client that sends what it declared and then closes always gets the
  real status rather than a failed write.

Event-loop thread only (the counters are plain ints, no lock).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from decoder_service.sampling import ResolvedSampling
from mmserve_core.runtime.heap import release_free_heap
from mmserve_core.runtime.logs import LOAD_HEADER
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ServeError
from mmserve_core.wire.tensors import Assembler, expected_nbytes

_IDLE = object()


@dataclass(frozen=True)
class StreamLimits:
    max_open: int = 256
    max_buffered_bytes: int = 1 << 30
    idle_timeout_s: float = 30.0


@dataclass
class Ticket:
    """One open stream's share of the limits; released when its ``open`` block ends."""

    reserved: int = 0


class StreamAdmission:
    """Open ``Generate`` RPCs (sending or generating) and the embedding bytes their streams
    may buffer while they send (event loop only)."""

    def __init__(self, limits: StreamLimits, metrics=None) -> None:
        self.limits = limits
        self.open_streams = 0
        self.reserved_bytes = 0
        self.metrics = metrics
        self._trim_pending = False
        self._last_trim = float("-inf")

    @contextlib.contextmanager
    def open(self) -> Iterator[Ticket]:
        if self.open_streams >= self.limits.max_open:
            self._refused("open_streams")
            raise ResourceExhausted(
                f"{self.open_streams} Generate streams are open, the limit (--max-open-streams) is "
                f"{self.limits.max_open}; retry later")
        self.open_streams += 1
        ticket = Ticket()
        try:
            yield ticket
        finally:
            self.open_streams -= 1
            self.release(ticket)

    def release(self, ticket: Ticket) -> None:
        if not ticket.reserved:
            return
        self.reserved_bytes -= ticket.reserved
        ticket.reserved = 0
        if self.reserved_bytes == 0:
            self._trim_soon()

    def _trim_soon(self) -> None:
        """When no stream holds embedding bytes any more, hand the freed heap back to the OS —
        at most once a second, the last one always (a trailing call), off the event loop."""
        loop = asyncio.get_running_loop()
        if self._trim_pending:
            return
        self._trim_pending = True
        delay = max(0.0, self._last_trim + 1.0 - loop.time())

        def run() -> None:
            self._trim_pending = False
            self._last_trim = loop.time()
            loop.run_in_executor(None, release_free_heap)

        loop.call_later(delay, run)

    def reserve(self, ticket: Ticket, nbytes: int) -> None:
        if self.reserved_bytes + nbytes > self.limits.max_buffered_bytes:
            self._refused("buffered_bytes")
            raise ResourceExhausted(
                f"this request's embeddings ({nbytes} bytes) would bring the bytes buffered across open "
                f"Generate streams to {self.reserved_bytes + nbytes}, over the limit (--max-buffered-bytes) "
                f"of {self.limits.max_buffered_bytes}; retry later")
        self.reserved_bytes += nbytes
        ticket.reserved += nbytes

    def _refused(self, why: str) -> None:
        if self.metrics is not None:
            self.metrics.streams_refused.labels(why).inc()


@dataclass(frozen=True)
class GenerateInput:
    """What a stream carried, checked: the prompt, its spans with their rows, the sampling."""

    ids: list[int]
    spans: list[T.SpanEmbedding]
    resolved: ResolvedSampling
    stop_token_ids: list[int]
    priority: str = "default"  # admission order while the decoder is full (T.PRIORITIES)
    cache_point: int = 0  # where the conversation's next turn departs (``cache_points``)


class StreamReader:
    """Reads one request stream: setup, then every span's chunks, then the close."""

    def __init__(self, requests: AsyncIterator, limits: StreamLimits, metrics=None) -> None:
        self._it = requests.__aiter__()
        self._limits = limits
        self._metrics = metrics
        self._received = 0

    async def next(self, waiting_for: str):
        """The next message, or ``None`` when the client closed its side."""
        try:
            msg = await asyncio.wait_for(self._it.__anext__(), self._limits.idle_timeout_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            msg = _IDLE  # raised below, outside this block: no exception context pins the stream's frames
        if msg is _IDLE:
            if self._metrics is not None:
                self._metrics.streams_idle_timeouts.inc()
            raise DeadlineExceeded(
                f"no message for {self._limits.idle_timeout_s:g} s on the Generate stream while waiting for "
                f"{waiting_for} (after {self._received} messages); the stream idle timeout is "
                f"--stream-idle-timeout-s")
        self._received += 1
        return msg

    async def drain(self, budget: int) -> None:
        """Drop what the client still sends, up to ``budget`` bytes, until it closes."""
        with contextlib.suppress(ServeError):
            while budget > 0:
                msg = await self.next("the end of the stream")
                if msg is None:
                    return
                budget -= len(msg.data) if isinstance(msg, T.SpanChunk) else 1


async def read_generate(reader: StreamReader, engine, admission: StreamAdmission, ticket: Ticket,
                        context) -> GenerateInput:
    """Setup → checks → reservation → headers → chunks → close, each step refusing with the reason."""
    first = await reader.next("the setup message")
    if first is None:
        raise InvalidArgument("Generate stream closed before the setup message")
    if not isinstance(first, T.GenerateSetup):
        raise InvalidArgument(f"the first Generate message must be a setup, got {_what(first)}")
    setup = first
    ids, declared, sampling = setup.ids, setup.spans, setup.sampling
    resolved = await engine.validate_async(ids, declared, sampling)
    check_cache_point(setup.cache_point, len(ids), [span for span, _, _ in declared])
    total = sum(expected_nbytes(dtype, shape) for _, dtype, shape in declared)
    admission.reserve(ticket, total)
    # "setup accepted": the client may send its chunks now; with the decoder's admission state
    in_system, capacity = engine.load
    await context.send_initial_metadata(((LOAD_HEADER, f"{in_system}/{capacity}"),))
    assemblers = [Assembler(f"spans[{i}]", dtype, shape) for i, (_, dtype, shape) in enumerate(declared)]
    try:
        await _receive_chunks(reader, assemblers)
        extra = await reader.next("the end of the stream")
    except InvalidArgument:
        received = sum(a.received for a in assemblers)
        assemblers.clear()  # free the buffers before waiting on the client
        await reader.drain(total - received + (1 << 20))
        raise
    if extra is not None:
        what = "embedding bytes beyond the declared spans" if isinstance(extra, T.SpanChunk) \
            else "a second setup message"
        raise InvalidArgument(f"received {what}; send the setup, every span's chunks, then close the stream")
    spans = [T.SpanEmbedding(span, a.finish()) for (span, _, _), a in zip(declared, assemblers)]
    return GenerateInput(ids, spans, resolved, sampling.stop_token_ids, setup.priority, setup.cache_point)


def check_cache_point(point: int, n: int, spans: list[T.Span]) -> None:
    """``setup.cache_point``: within the prompt, never inside a media block."""
    if point > n:
        raise InvalidArgument(f"setup.cache_point = {point} is past the prompt's end ({n} tokens)")
    for i, s in enumerate(spans):
        if s.offset < point < s.offset + s.length:
            raise InvalidArgument(f"setup.cache_point = {point} is inside spans[{i}] (positions {s.offset} to "
                                  f"{s.offset + s.length - 1}); a cache entry cannot end inside a media block")


async def _receive_chunks(reader: StreamReader, assemblers: list[Assembler]) -> None:
    pending = sum(1 for a in assemblers if not a.complete)
    while pending:
        missing = [i for i, a in enumerate(assemblers) if not a.complete]
        msg = await reader.next(f"the embeddings of spans {missing}")
        if msg is None:
            raise InvalidArgument(f"Generate stream ended before the embeddings of spans {missing} were complete")
        if not isinstance(msg, T.SpanChunk):
            raise InvalidArgument("only embedding chunks may follow the setup message")
        index, offset, data = msg.index, msg.offset, msg.data  # data: usually a view into the received bytes
        if index >= len(assemblers):
            raise InvalidArgument(
                f"chunk for span_index {index}, but only {len(assemblers)} spans were declared")
        a = assemblers[index]
        if a.complete:
            raise InvalidArgument(f"spans[{index}]: received more bytes than declared")
        a.add(offset, data)
        msg = data = None  # the assembler holds the bytes now; a stall must not pin a second copy
        if a.complete:
            pending -= 1


def _what(msg) -> str:
    return "chunk" if isinstance(msg, T.SpanChunk) else str(msg)

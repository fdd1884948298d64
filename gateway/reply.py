"""What every front does around its own parser and formatter: the route skeleton and the one fold.

Why: each client API is a parser (body → ``ChatRequest``) and a formatter (events → its API's
shapes); everything between them is the same for all and lives here once —

* ``begin``: the request id, parse + ``Pipeline.start`` with every failure in the API's own error
  shape (``failure_response``, by path), the time to the first event and the status counter;
* ``fold``: a non-streamed reply is one folded result of the event stream (text, thought, ids,
  logprobs, the deltas in order, the ``Done``), while a client that goes away cancels the
  decoder sequence; a stream that ends without a ``Done`` is the same error on every front — 502
  (``UNAVAILABLE`` on the typed gRPC API), the upstream broke its promise;
* ``sse``: the streaming response every front returns (request id header, no caching), which
  cancels the sequence when the client disconnects or the stream ends.

Event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.errors import HTTPError, failure_response
from gateway.events import Delta, Done
from gateway.pipeline import Generation, Pipeline
from mmserve_core.runtime.logs import REQUEST_ID_HEADER, get_logger, new_request_id, request_id_var
from mmserve_core.wire import types as T

log = get_logger(__name__)
NO_DONE = "decoder stream ended without a completion"


def no_done() -> HTTPError:
    """The decoder's stream ended without its final message: the same error on every front."""
    return HTTPError(502, NO_DONE, type_="server_error", code="upstream_incomplete")


@dataclass
class Folded:
    """A whole generation: the deltas in order, what they add up to, and its ``Done``."""

    deltas: list[Delta] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[T.TokenLogprob] = field(default_factory=list)
    reasoning_tokens: int = 0  # tokens spent inside the thought channel only
    done: Done | None = None

    def add(self, ev: Delta | Done) -> None:
        if isinstance(ev, Done):
            self.done = ev
            return
        self.deltas.append(ev)
        self.content.append(ev.content)
        self.reasoning.append(ev.reasoning)
        self.token_ids.extend(ev.token_ids)
        self.logprobs.extend(ev.logprobs)
        if ev.reasoning and not ev.content:
            self.reasoning_tokens += len(ev.token_ids)

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def thought(self) -> str:
        return "".join(self.reasoning)


async def fold(gen: Generation, disconnected: Callable[[], Awaitable[bool]] | None = None) -> Folded:
    """Collect ``gen``'s events; ``disconnected`` (an async predicate) is polled meanwhile and a client
    that gives up cancels its decoder sequence.  Raises ``HTTPError`` (the upstream's, or ``no_done``)."""
    out = Folded()
    watcher = asyncio.ensure_future(_cancel_on_disconnect(gen, disconnected)) if disconnected else None
    try:
        async for ev in gen.events():
            out.add(ev)
    finally:
        if watcher is not None:
            watcher.cancel()
        gen.cancel()
    if out.done is None:
        raise no_done()
    return out


async def _cancel_on_disconnect(gen: Generation, disconnected, interval_s: float = 0.25) -> None:
    while not gen.done():
        if await disconnected():
            log.info("client disconnected; cancelling generation")
            gen.cancel()
            return
        await asyncio.sleep(interval_s)


@dataclass
class Started:
    rid: str
    parsed: Any  # what the front's parser returned
    gen: Generation


async def begin(request: Request, pipeline: Pipeline, metrics, what: str,
                parse: Callable[[], Awaitable[tuple[Any, Any]]]) -> Started | JSONResponse:
    """Parse and start a request: ``parse()`` returns ``(front's parsed request, ChatRequest)``.
    Any failure is the error response of the API the path belongs to (counted, traceback logged
    only for a bug)."""
    rid = request_id_var.get() or new_request_id()
    t0 = time.perf_counter()
    try:
        parsed, chat = await parse()
        gen = await pipeline.start(chat, rid)
    except Exception as e:  # noqa: BLE001 - every failure becomes the API's error body
        return failure_response(e, request.url.path, what, metrics)
    metrics.ttft.observe(time.perf_counter() - t0)
    metrics.requests.labels("200").inc()
    return Started(rid, parsed, gen)


def sse(events: AsyncIterator[str], rid: str, gen: Generation) -> StreamingResponse:
    """The streamed reply: ``events`` as ``text/event-stream``; the sequence is cancelled when the
    stream ends or the client goes (the server cancels the body's iterator then)."""

    async def body():
        try:
            async for e in events:
                yield e
        finally:
            gen.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", REQUEST_ID_HEADER: rid})

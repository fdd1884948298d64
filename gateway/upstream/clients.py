"""grpc.aio clients for the encoder and decoder pools, on the gateway's event loop.

Why: the gateway streams media to the encoder and embeddings to the decoder
without blocking its ASGI loop; the request id travels as ``x-request-id``
metadata so both services log under it.  Embedding bytes are passed through
untouched (the encoder is asked for the decoder's dtype), re-chunked under
gRPC's default message size.  Event-loop thread.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gateway.upstream.pool import Lease, Upstream, UpstreamPool
from gateway.upstream.replicas import NoReplica, Replicas
from mmserve_core.runtime.logs import LOAD_HEADER, REQUEST_ID_HEADER
from mmserve_core.wire import codec
from mmserve_core.wire import types as T
from mmserve_core.wire.chunk_frames import write_chunk
from mmserve_core.wire.generate_stream import write_generate
from mmserve_core.wire.stubs import DecoderStub, EncoderStub, decoder_pb2, encoder_pb2
from mmserve_core.wire.tensors import MAX_CHUNK_BYTES, iter_views


def _md(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_HEADER, request_id),)


FULL_RETRY_ROUNDS = 3  # rounds over every replica when all answered RESOURCE_EXHAUSTED, then 429
FULL_BACKOFF_S = 0.05  # first round's back-off cap (doubling), full jitter


async def _with_failover(pool: UpstreamPool, attempt: Callable[[Any, Lease], Awaitable[Any]],
                         key: bytes | None = None, *, hold: bool = False,
                         eligible: Callable[[Upstream], bool] | None = None) -> Any:
    """Run ``attempt(stub, lease)`` on one replica; on UNAVAILABLE (down) or RESOURCE_EXHAUSTED
    (full) try the others, each at most once a round.  When every replica was full, wait a
    jittered, doubling back-off and go round again (``FULL_RETRY_ROUNDS``): the client sees 429
    only when all stayed full.  The ``lease`` counts the call in its replica's load; it is
    released when ``attempt`` returns or raises — or, with ``hold``, when the RPC the attempt
    started ends (the attempt hands it to its call: a Generate stream outlives this function).

    Only for calls that are safe to repeat: a whole Encode, GetModelInfo, or a
    Generate that has not produced anything yet (both answers come before any work is kept)."""
    tried: set[str] = set()
    rounds = 0
    last: grpc.aio.AioRpcError | None = None
    while True:
        u = pool.pick(exclude=tried, key=key, eligible=eligible)
        if u is None:  # every eligible replica tried this round (or none is eligible)
            if last is not None:
                raise last
            raise NoReplica("no decoder can take this request")
        tried.add(u.address)
        lease = Lease(u)
        try:
            result = await attempt(u.stub, lease)
        except grpc.aio.AioRpcError as e:
            lease.release()
            code = e.code()
            pool.record(u, code.name)
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise
            last = e
            if pool.pick(exclude=tried, eligible=eligible) is not None:
                continue
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED or rounds >= FULL_RETRY_ROUNDS:
                raise
            rounds += 1
            tried.clear()
            await asyncio.sleep(random.uniform(0, FULL_BACKOFF_S * 2 ** (rounds - 1)))
            continue
        except BaseException:
            lease.release()
            raise
        if not hold:
            lease.release()
        pool.record(u, "OK")
        return result


class EncoderClient:
    """Encoders behind one pool: whole requests fail over on UNAVAILABLE."""

    def __init__(self, targets: str, timeout_s: float, credentials=None) -> None:
        self.pool = UpstreamPool("encoder", targets, EncoderStub, credentials=credentials)
        self.timeout_s = timeout_s

    def start(self) -> None:
        self.pool.start()

    async def modalities(self, request_id: str) -> set[str]:
        """The modalities the encoders have towers (or embedders) for."""
        r = await _with_failover(self.pool, lambda stub, _: stub.GetEncoderInfo(
            encoder_pb2.GetEncoderInfoRequest(), metadata=_md(request_id), timeout=self.timeout_s))
        return {codec.MODALITY_FROM_PB[m] for m in r.modalities}

    async def encode(self, items: list[T.MediaInput], dtype: str, request_id: str) -> list[T.EncodedItem]:
        req = encoder_pb2.EncodeRequest(items=codec.media_to_pb(items), output_dtype=codec.DTYPE_TO_PB[dtype],
                                        max_chunk_bytes=MAX_CHUNK_BYTES)  # each item in one message

        async def attempt(stub, _) -> list[T.EncodedItem]:
            stream = codec.EncodedStream(len(items))
            async for msg in stub.Encode(req, metadata=_md(request_id), timeout=self.timeout_s):
                stream.add(msg)
            return stream.items()

        return await _with_failover(self.pool, attempt)

    async def close(self) -> None:
        await self.pool.close()


class StreamStalled(grpc.aio.AioRpcError):
    """A Generate that sent nothing for longer than its idle timeout: DEADLINE_EXCEEDED, raised where
    the call's own errors are, so every front maps it like any deadline (504 ``timeout``)."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         details=f"the decoder sent nothing for {seconds:g} s {what}")


class NotAccepted(grpc.aio.AioRpcError):
    """A decoder that did not answer a Generate's setup in time (a partition, a hung host): UNAVAILABLE,
    so the replica is marked down and the request — nothing computed yet — goes to another."""

    def __init__(self, seconds: float) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         details=f"the decoder did not accept the request within {seconds:g} s")


class DecoderClient:
    """Decoders behind one pool.  A Generate fails over only before its first message:
    after that, tokens have reached the client and a retry would repeat them.

    Deadlines follow progress, not the clock: a Generate has no call deadline (a long generation is
    never cut because it is long — ``max_tokens`` bounds it); it is timed out when its decoder sends
    nothing for ``idle_timeout_s`` between messages, or no first message within
    ``first_token_timeout_s`` (queueing and the prompt's prefill: bounded work, but a long prompt's
    prefill can take minutes on a laptop, so its own, longer, bound).  Before that, the decoder must
    accept the setup (its response headers) within ``accept_timeout_s``, else the replica counts as
    down and the request goes to another: a partitioned host answers nothing, not even a reset.
    Unary calls keep ``timeout_s``."""

    def __init__(self, targets: str, timeout_s: float, credentials=None, *,
                 idle_timeout_s: float = 60.0, first_token_timeout_s: float | None = None,
                 accept_timeout_s: float = 10.0) -> None:
        self.pool = UpstreamPool("decoder", targets, DecoderStub, credentials=credentials)
        self.timeout_s = timeout_s
        self.replicas = Replicas(self.pool, self._describe)
        self.idle_timeout_s = idle_timeout_s
        self.accept_timeout_s = accept_timeout_s
        self.first_token_timeout_s = first_token_timeout_s if first_token_timeout_s is not None else timeout_s

    def start(self) -> None:
        self.pool.start()

    async def _describe(self, u: Upstream) -> T.ModelInfo:
        r = await u.stub.GetModelInfo(decoder_pb2.GetModelInfoRequest(), timeout=self.timeout_s)
        return codec.model_info_from_pb(r)

    async def model_info(self, request_id: str) -> T.ModelInfo:
        """A routable replica's model facts (each replica is described on its own: ``replicas``)."""
        await self.replicas.refresh()
        return self.replicas.first_info()

    async def start_generate(
        self,
        ids: list[int],
        spans: list[T.SpanEmbedding],
        sampling: T.SamplingParams,
        request_id: str,
        affinity: bytes | None = None,
        priority: str = "default",
        cache_point: int = 0,
        needs: dict[str, str] | None = None,
    ):
        """Start a Generate and wait for its first message: ``(call, first)``.

        ``affinity``: the conversation's key (``gateway.affinity``) — its turns go to
        one decoder, whose prefix cache holds the earlier turns.  ``priority``
        (``T.PRIORITIES``): its place among waiting requests when the decoder is full.
        ``cache_point``: where the conversation's next turn departs (the decoder keeps an entry there).
        ``needs``: capability → the field that needs it; only replicas declaring them all are tried.
        Iterate ``call.read()`` for the rest; ``call.cancel()`` stops the sequence."""

        setup = decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
            prompt_token_ids=ids,
            spans=[codec.span_to_pb(s.span, s.tensor) for s in spans],
            sampling=codec.sampling_to_pb(sampling),
            priority=codec.PRIORITY_TO_PB[priority] if priority != "default" else 0,
            cache_point=cache_point,
        ))
        plain = None  # the setup without its cache point, for a replica that predates them
        if cache_point:
            plain = decoder_pb2.GenerateRequest()
            plain.CopyFrom(setup)
            plain.setup.cache_point = 0

        def chunks():  # serialized straight from the encoder's assembled rows: one copy per byte
            for i, s in enumerate(spans):
                for off, data in iter_views(s.tensor.data, MAX_CHUNK_BYTES):
                    yield write_chunk(i, off, data)

        async def first_message(call, message):
            await write_generate(call, message, chunks())
            return await call.read()

        async def attempt(stub, lease: Lease):
            info = lease.upstream.info
            message = setup if plain is None or (info is not None and "cache_point" in info.capabilities) else plain
            call = stub.Generate(metadata=_md(request_id))  # no call deadline: see the class docstring
            call.add_done_callback(lease.release)  # the stream counts against its replica until it ends
            work = asyncio.ensure_future(first_message(call, message))
            try:
                t0 = time.monotonic()
                try:  # the decoder answers the setup with its headers before anything is computed
                    headers = await asyncio.wait_for(asyncio.shield(call.initial_metadata()), self.accept_timeout_s)
                except asyncio.TimeoutError:  # noqa: UP041 - Python 3.10 has its own
                    raise NotAccepted(self.accept_timeout_s) from None
                lease.upstream.report(dict(headers or ()).get(LOAD_HEADER))
                left = max(0.0, self.first_token_timeout_s - (time.monotonic() - t0))
                try:
                    first = await asyncio.wait_for(asyncio.shield(work), left)
                except asyncio.TimeoutError:  # noqa: UP041
                    raise StreamStalled("before its first token", self.first_token_timeout_s) from None
                return DecoderStream(call, first, self.idle_timeout_s)
            except BaseException:
                call.cancel()
                work.cancel()
                if work.done() and not work.cancelled():
                    work.exception()  # retrieved: its error is the one raised here, or moot
                raise

        await self.replicas.refresh()
        self.replicas.check(needs or {})
        eligible = self.replicas.eligible(frozenset(needs or ()))
        return await _with_failover(self.pool, attempt, affinity, hold=True, eligible=eligible)

    async def close(self) -> None:
        await self.pool.close()


class DecoderStream:
    """A running Generate as typed events — the decoder's messages are decoded here, at the
    transport, so the pipeline never sees one.  ``events()`` raises the call's
    ``grpc.aio.AioRpcError`` if it fails; ``cancel()`` ends the sequence."""

    def __init__(self, call: grpc.aio.StreamStreamCall, first, idle_timeout_s: float | None = None) -> None:
        self._call, self._first = call, first
        self._idle = idle_timeout_s

    @property
    def empty(self) -> bool:
        """The decoder closed the stream without a single message."""
        return self._first is grpc.aio.EOF

    async def events(self) -> AsyncIterator[T.TokenEvent | T.Completion]:
        msg = self._first
        while msg is not grpc.aio.EOF:
            yield codec.generate_response_from_pb(msg)
            try:
                msg = await asyncio.wait_for(self._call.read(), self._idle)
            except asyncio.TimeoutError:  # noqa: UP041 - Python 3.10 has its own
                self._call.cancel()  # the decoder stops the sequence (and frees its slot) on cancel
                raise StreamStalled("between tokens", self._idle) from None

    def cancel(self) -> None:
        self._call.cancel()

    def done(self) -> bool:
        return self._call.done()


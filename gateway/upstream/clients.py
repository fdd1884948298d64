"""grpc.aio clients for the encoder and decoder pools, on the gateway's event loop.

Why: the gateway streams media to the encoder and embeddings to the decoder
without blocking its ASGI loop; the request id travels as ``x-request-id``
metadata so both services log under it.  Embedding bytes are passed through
untouched (the encoder is asked for the decoder's dtype), re-chunked under
gRPC's default message size.  Event-loop thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from gateway.upstream.pool import UpstreamPool
from mmserve_core.runtime.logs import REQUEST_ID_HEADER
from mmserve_core.wire import codec
from mmserve_core.wire import types as T
from mmserve_core.wire.chunk_frames import write_chunk
from mmserve_core.wire.generate_stream import write_generate
from mmserve_core.wire.stubs import DecoderStub, EncoderStub, decoder_pb2, encoder_pb2
from mmserve_core.wire.tensors import MAX_CHUNK_BYTES, iter_views


def _md(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_HEADER, request_id),)


async def _with_failover(pool: UpstreamPool, attempt: Callable[[Any], Awaitable[Any]],
                         key: bytes | None = None) -> Any:
    """Run ``attempt(stub)`` on one address; on UNAVAILABLE try the others (each at most once).

    Only for calls that are safe to repeat: a whole Encode, GetModelInfo, or a
    Generate that has not produced anything yet."""
    tried: set[str] = set()
    while True:
        u = pool.pick(exclude=tried, key=key)
        tried.add(u.address)
        try:
            result = await attempt(u.stub)
        except grpc.aio.AioRpcError as e:
            pool.record(u, e.code().name)
            if e.code() != grpc.StatusCode.UNAVAILABLE or len(tried) >= len(pool):
                raise
            continue
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
        r = await _with_failover(self.pool, lambda stub: stub.GetEncoderInfo(
            encoder_pb2.GetEncoderInfoRequest(), metadata=_md(request_id), timeout=self.timeout_s))
        return {codec.MODALITY_FROM_PB[m] for m in r.modalities}

    async def encode(self, items: list[T.MediaInput], dtype: str, request_id: str) -> list[T.EncodedItem]:
        req = encoder_pb2.EncodeRequest(items=codec.media_to_pb(items), output_dtype=codec.DTYPE_TO_PB[dtype],
                                        max_chunk_bytes=MAX_CHUNK_BYTES)  # each item in one message

        async def attempt(stub) -> list[T.EncodedItem]:
            stream = codec.EncodedStream(len(items))
            async for msg in stub.Encode(req, metadata=_md(request_id), timeout=self.timeout_s):
                stream.add(msg)
            return stream.items()

        return await _with_failover(self.pool, attempt)

    async def close(self) -> None:
        await self.pool.close()


class DecoderClient:
    """Decoders behind one pool.  A Generate fails over only before its first message:
    after that, tokens have reached the client and a retry would repeat them."""

    def __init__(self, targets: str, timeout_s: float, credentials=None) -> None:
        self.pool = UpstreamPool("decoder", targets, DecoderStub, credentials=credentials)
        self.timeout_s = timeout_s

    def start(self) -> None:
        self.pool.start()

    async def model_info(self, request_id: str) -> T.ModelInfo:
        r = await _with_failover(self.pool, lambda stub: stub.GetModelInfo(
            decoder_pb2.GetModelInfoRequest(), metadata=_md(request_id), timeout=self.timeout_s))
        return codec.model_info_from_pb(r)

    async def start_generate(
        self,
        ids: list[int],
        spans: list[T.SpanEmbedding],
        sampling: T.SamplingParams,
        request_id: str,
        affinity: bytes | None = None,
        priority: str = "default",
    ):
        """Start a Generate and wait for its first message: ``(call, first)``.

        ``affinity``: the conversation's key (``conversation_key``) — its turns go to
        one decoder, whose prefix cache holds the earlier turns.  ``priority``
        (``T.PRIORITIES``): its place among waiting requests when the decoder is full.
        Iterate ``call.read()`` for the rest; ``call.cancel()`` stops the sequence."""

        setup = decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
            prompt_token_ids=ids,
            spans=[codec.span_to_pb(s.span, s.tensor) for s in spans],
            sampling=codec.sampling_to_pb(sampling),
            priority=codec.PRIORITY_TO_PB[priority] if priority != "default" else 0,
        ))

        def chunks():  # serialized straight from the encoder's assembled rows: one copy per byte
            for i, s in enumerate(spans):
                for off, data in iter_views(s.tensor.data, MAX_CHUNK_BYTES):
                    yield write_chunk(i, off, data)

        async def attempt(stub):
            call = stub.Generate(metadata=_md(request_id), timeout=self.timeout_s)
            try:
                await write_generate(call, setup, chunks())
                return DecoderStream(call, await call.read())
            except BaseException:
                call.cancel()
                raise

        return await _with_failover(self.pool, attempt, affinity)

    async def close(self) -> None:
        await self.pool.close()


class DecoderStream:
    """A running Generate as typed events — the decoder's messages are decoded here, at the
    transport, so the pipeline never sees one.  ``events()`` raises the call's
    ``grpc.aio.AioRpcError`` if it fails; ``cancel()`` ends the sequence."""

    def __init__(self, call: grpc.aio.StreamStreamCall, first) -> None:
        self._call, self._first = call, first

    @property
    def empty(self) -> bool:
        """The decoder closed the stream without a single message."""
        return self._first is grpc.aio.EOF

    async def events(self) -> AsyncIterator[T.TokenEvent | T.Completion]:
        msg = self._first
        while msg is not grpc.aio.EOF:
            yield codec.generate_response_from_pb(msg)
            msg = await self._call.read()

    def cancel(self) -> None:
        self._call.cancel()

    def done(self) -> bool:
        return self._call.done()


def conversation_key(ids: list[int], spans: list[T.SpanEmbedding], end_of_turn: set[int]) -> bytes:
    """What every turn of one conversation shares: the prompt up to the end of its first turn
    (the system prompt and the first user message), with the media in it by content hash.

    Turn 2's prompt starts with turn 1's, so both hash alike; two conversations that
    share a system prompt but not a first question do not.  Without an end-of-turn
    token in the prompt the whole prompt is the key."""
    cut = next((i + 1 for i, t in enumerate(ids) if t in end_of_turn), len(ids))
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(ids[:cut], np.int64).tobytes())
    for s in spans:
        if s.span.offset < cut:
            h.update(s.span.content_hash.encode())
    return h.digest()

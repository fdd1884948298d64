"""The asyncio Generate writer against a decoder that refuses at once and one that never sends
early headers (an older decoder in a rolling upgrade): the right status, and no hang."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mmserve_core.runtime.grpc_runtime import add_servicer
from mmserve_core.wire import generate_stream
from mmserve_core.wire.stubs import decoder_pb2, decoder_pb2_grpc


class _OldDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    """Reads the whole stream, then answers: its headers come with its first message."""

    async def Generate(self, it, context):
        n = 0
        async for _ in it:
            n += 1
        yield decoder_pb2.GenerateResponse(token=decoder_pb2.TokenChunk(token_ids=[n]))

    async def GetModelInfo(self, request, context):
        return decoder_pb2.GetModelInfoResponse()


class _RefusingDecoder(_OldDecoder):
    async def Generate(self, it, context):
        await it.__anext__()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
        yield decoder_pb2.GenerateResponse()


async def _run(servicer, chunks: int):
    server = grpc.aio.server()
    add_servicer(server, servicer, decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = decoder_pb2_grpc.DecoderServiceStub(ch).Generate(timeout=30)
            setup = decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(prompt_token_ids=[2]))
            chunk = decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(data=b"\0" * 65536))
            await generate_stream.write_generate(call, setup, [chunk] * chunks)
            return await call.read()
    finally:
        await server.stop(0)


def test_an_old_decoder_without_early_headers_still_gets_its_chunks(monkeypatch):
    monkeypatch.setattr(generate_stream, "HEADERS_WAIT_S", 0.2)
    msg = asyncio.run(asyncio.wait_for(_run(_OldDecoder(), 3), 10))
    assert list(msg.token.token_ids) == [4]  # setup + 3 chunks arrived


def test_a_refused_setup_reports_the_decoders_status_every_time():
    for _ in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            asyncio.run(_run(_RefusingDecoder(), 64))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details() == "prompt too long"

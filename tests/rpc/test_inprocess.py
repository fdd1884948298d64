"""Real gRPC servers in this process on ephemeral ports: raw RPCs, reflection, health."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderEngine
from decoder_service.server import SERVICE_NAME as DECODER
from decoder_service.server import start_decoder_server
from deploy.demo.media import shape_png, tone_wav
from encoder_service.config import EncoderConfig
from encoder_service.engine import EncoderEngine
from encoder_service.server import SERVICE_NAME as ENCODER
from encoder_service.server import start_encoder_server
from mmserve_core.runtime.grpc_runtime import create_server, set_serving
from mmserve_core.wire.stubs import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def servers(ckpt_dense):
    enc = EncoderEngine(EncoderConfig(checkpoint=str(ckpt_dense), port=0))
    dec = DecoderEngine(DecoderConfig(checkpoint=str(ckpt_dense), port=0))
    enc.start()
    dec.start()
    es, eport, ehealth = await start_encoder_server(enc, "127.0.0.1:0")
    ds, dport, dhealth = await start_decoder_server(dec, "127.0.0.1:0")
    await enc.wait_ready()
    await set_serving(ehealth, [ENCODER], True)
    await dec.wait_ready()
    await set_serving(dhealth, [DECODER], True)
    ech = grpc.aio.insecure_channel(f"127.0.0.1:{eport}")
    dch = grpc.aio.insecure_channel(f"127.0.0.1:{dport}")
    yield {"enc": ech, "dec": dch}
    await ech.close()
    await dch.close()
    await es.stop(0)
    await ds.stop(0)
    enc.stop()
    dec.stop()


async def _encode_image(ch):
    stub = encoder_pb2_grpc.EncoderServiceStub(ch)
    req = encoder_pb2.EncodeRequest(items=[encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE,
                                                                 data=shape_png(size=(96, 64)))],
                                    max_chunk_bytes=4096)
    header, chunks = None, []
    async for msg in stub.Encode(req):
        if msg.WhichOneof("payload") == "header":
            header = msg.header
        else:
            chunks.append(msg.chunk)
    return header, chunks


async def test_encoder_streams_chunks_under_limit(servers):
    header, chunks = await _encode_image(servers["enc"])
    rows, width = header.tensor.shape
    assert header.soft_token_count == rows and width == 64
    assert header.tensor.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert len(header.content_hash) == 64
    assert len(chunks) > 1 and all(len(c.data) <= 4096 for c in chunks)
    assert sum(len(c.data) for c in chunks) == rows * width * 2


async def test_encoder_rejects_audio_without_tower(servers):
    stub = encoder_pb2_grpc.EncoderServiceStub(servers["enc"])
    req = encoder_pb2.EncodeRequest(items=[encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_AUDIO,
                                                                 data=tone_wav(0.5))])
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stub.Encode(req):
            pass
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no audio tower" in ei.value.details()


async def _generate(ch, setup, chunks):
    stub = decoder_pb2_grpc.DecoderServiceStub(ch)

    async def reqs():
        yield decoder_pb2.GenerateRequest(setup=setup)
        for c in chunks:
            yield decoder_pb2.GenerateRequest(chunk=c)

    return [m async for m in stub.Generate(reqs())]


def _setup(rows, length=None, offset=4, max_tokens=3):
    ids = [2, 105, 10, 250] + [252] * rows + [254, 106, 105, 10]
    span = decoder_pb2.EmbeddingSpan(
        placement=tensor_pb2.PlaceholderSpan(offset=offset, length=length or rows,
                                             modality=tensor_pb2.MODALITY_IMAGE),
        tensor=tensor_pb2.TensorSpec(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=[rows, 64]),
    )
    return decoder_pb2.GenerateSetup(prompt_token_ids=ids, spans=[span],
                                     sampling=decoder_pb2.SamplingParams(temperature=0, max_tokens=max_tokens))


async def test_decoder_generates_from_encoder_rows(servers):
    header, chunks = await _encode_image(servers["enc"])
    rows = header.soft_token_count
    out = await _generate(servers["dec"], _setup(rows), [
        decoder_pb2.EmbeddingChunk(span_index=0, byte_offset=c.byte_offset, data=c.data) for c in chunks])
    assert out[-1].WhichOneof("payload") == "complete"
    done = out[-1].complete
    assert done.usage.prompt_tokens == rows + 8 and done.usage.soft_tokens == rows


async def test_span_length_mismatch_is_invalid_argument(servers):
    rows = 6
    data = np.zeros((rows, 64), np.uint16).tobytes()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _generate(servers["dec"], _setup(rows, length=5),
                        [decoder_pb2.EmbeddingChunk(span_index=0, byte_offset=0, data=data)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "span length 5 != embedding rows 6" in ei.value.details()


async def test_chunk_stream_that_lies_about_size(servers):
    rows = 6
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _generate(servers["dec"], _setup(rows),
                        [decoder_pb2.EmbeddingChunk(span_index=0, byte_offset=0, data=b"\0" * 10)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended before the embeddings of spans [0] were complete" in ei.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _generate(servers["dec"], _setup(rows),
                        [decoder_pb2.EmbeddingChunk(span_index=3, byte_offset=0, data=b"\0")])
    assert "span_index 3" in ei.value.details()


async def test_model_info(servers):
    info = await decoder_pb2_grpc.DecoderServiceStub(servers["dec"]).GetModelInfo(decoder_pb2.GetModelInfoRequest())
    assert list(info.eos_token_ids) == [1, 50, 106]
    assert info.hidden_size == 64 and info.bidirectional_vision and not info.per_layer_inputs
    assert [m.modality for m in info.modalities] == [tensor_pb2.MODALITY_IMAGE, tensor_pb2.MODALITY_VIDEO]
    assert "<|turn>" in info.chat_template and "<|image|>" in info.chat_template


async def test_health_serving(servers):
    for ch, name in ((servers["enc"], ENCODER), (servers["dec"], DECODER)):
        for svc in (name, ""):
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=svc))
            assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_not_serving_until_flipped():
    """grpc's HealthServicer says SERVING for "" by default; ours must not while loading."""
    server, port, health = await create_server("127.0.0.1:0", [DECODER])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for svc in ("", DECODER):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=svc))
                assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING, svc
            await set_serving(health, [DECODER], True)
            r = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def _reflect(ch, **req):
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)

    async def reqs():
        yield reflection_pb2.ServerReflectionRequest(**req)

    return [r async for r in stub.ServerReflectionInfo(reqs())][0]


async def test_reflection_lists_and_describes(servers):
    """What ``grpcurl list`` / ``grpcurl describe`` do."""
    from google.protobuf import descriptor_pb2

    for ch, name, methods in ((servers["enc"], ENCODER, {"Encode", "GetEncoderInfo"}),
                              (servers["dec"], DECODER, {"Generate", "GetModelInfo"})):
        listed = await _reflect(ch, list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert {name, "grpc.health.v1.Health"} <= names
        desc = await _reflect(ch, file_containing_symbol=name)
        found = set()
        for raw in desc.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for svc in fd.service:
                found |= {m.name for m in svc.method}
        assert methods <= found

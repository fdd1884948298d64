"""The typed gRPC chat API on the gateway: same tokens as HTTP, raw bytes on the wire, same errors."""

from __future__ import annotations

import base64
import io

import grpc
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from deploy.demo.media import shape_png, tone_wav
from mmserve_core.wire.stubs import chat_pb2, chat_pb2_grpc

pytestmark = pytest.mark.e2e
NO_EOS = {1: -100.0, 106: -100.0, 50: -100.0}


def _stub(svc):
    return chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(svc.chat_addr))


def _conversation(media_dir):
    png, wav = (media_dir / "red_circle.png").read_bytes(), (media_dir / "tone_0p7s.wav").read_bytes()
    grpc_msgs = [
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, parts=[chat_pb2.Part(text="Be brief.")]),
        chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[
            chat_pb2.Part(text="Look:"), chat_pb2.Part(image=chat_pb2.ImagePart(data=png, mime_type="image/png"))]),
        chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT, parts=[chat_pb2.Part(text="A circle.")]),
        chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[
            chat_pb2.Part(audio=chat_pb2.AudioPart(data=wav, format="wav")), chat_pb2.Part(text="and this?")]),
    ]
    http_msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png).decode()}}]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(wav).decode(), "format": "wav"}}, {"type": "text", "text": "and this?"}]},
    ]
    return grpc_msgs, http_msgs


def test_same_conversation_same_tokens_and_usage_as_http(services_e2b, media_dir):
    grpc_msgs, http_msgs = _conversation(media_dir)
    params = chat_pb2.ChatParams(max_tokens=10, temperature=0, logit_bias=NO_EOS)
    chat = chat_pb2.ChatRequest(messages=grpc_msgs, params=params, return_prompt_token_ids=True)
    stream = list(_stub(services_e2b).Complete(chat_pb2.CompleteRequest(chat=chat)))
    deltas, final = [m.delta for m in stream[:-1]], stream[-1].final
    unary = _stub(services_e2b).CompleteUnary(chat_pb2.CompleteUnaryRequest(chat=chat))
    http = openai.OpenAI(base_url=services_e2b.base_url, api_key="x").chat.completions.create(
        model="m", messages=http_msgs, max_tokens=10, temperature=0, logit_bias={str(k): v for k, v in NO_EOS.items()},
        extra_body={"return_token_ids": True})
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == list(unary.message.token_ids) == http.choices[0].model_extra["token_ids"]
    assert "".join(d.content for d in deltas) == unary.message.content == http.choices[0].message.content
    assert list(final.prompt_token_ids) == http.model_extra["prompt_token_ids"]
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.soft_tokens) == (
        http.usage.prompt_tokens, http.usage.completion_tokens, http.usage.prompt_tokens_details.soft_tokens)
    assert final.finish_reason == chat_pb2.FINISH_REASON_LENGTH and final.timings.prefill_ms > 0


def test_media_travel_as_raw_bytes(services_e2b):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(buf, "PNG")  # 1 megapixel
    image, clip = buf.getvalue(), tone_wav(10.0, 16000)
    req = chat_pb2.CompleteUnaryRequest(chat=chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[
            chat_pb2.Part(image=chat_pb2.ImagePart(data=image, detail=chat_pb2.IMAGE_DETAIL_LOW)),
            chat_pb2.Part(audio=chat_pb2.AudioPart(data=clip)), chat_pb2.Part(text="what?")])],
        params=chat_pb2.ChatParams(max_tokens=1)))
    media = len(image) + len(clip)
    assert len(req.SerializeToString()) <= media * 1.01  # base64 JSON would be 1.33x
    r = _stub(services_e2b).CompleteUnary(req)
    assert r.final.usage.soft_tokens == 250 + 64  # 10 s of audio + a square image at the 70 budget (8x8 pooled)


def test_errors_match_the_http_front(services_e2b, services_moe, media_dir):
    def both(svc, grpc_parts, http_content, **params):
        with pytest.raises(grpc.RpcError) as g:
            _stub(svc).CompleteUnary(chat_pb2.CompleteUnaryRequest(chat=chat_pb2.ChatRequest(
                messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=grpc_parts)],
                params=chat_pb2.ChatParams(**params))))
        with pytest.raises(openai.BadRequestError) as h:
            openai.OpenAI(base_url=svc.base_url, api_key="x", max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": http_content}], **params)
        assert g.value.details() == h.value.body["message"]
        return g.value.code()

    wav = tone_wav(0.5, 16000)
    code = both(services_moe, [chat_pb2.Part(audio=chat_pb2.AudioPart(data=wav, format="wav"))],
                [{"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    bad = shape_png()[:300]
    code = both(services_e2b, [chat_pb2.Part(image=chat_pb2.ImagePart(data=bad))],
                [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(bad).decode()}}])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code = both(services_e2b, [chat_pb2.Part(text="hi")], "hi", max_tokens=100_000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_request_id(services_e2b):
    ch = grpc.insecure_channel(services_e2b.chat_addr)
    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mmserve.chat.v1.ChatService"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    listing = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))[0]
    assert "mmserve.chat.v1.ChatService" in {s.name for s in listing.list_services_response.service}
    req = chat_pb2.CompleteUnaryRequest(chat=chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[chat_pb2.Part(text="x")])],
        params=chat_pb2.ChatParams(max_tokens=1)))
    _, call = chat_pb2_grpc.ChatServiceStub(ch).CompleteUnary.with_call(req, metadata=(("x-request-id", "abc-123"),))
    assert ("x-request-id", "abc-123") in tuple(call.trailing_metadata())
    assert "abc-123" in services_e2b.logs("gateway") and "abc-123" in services_e2b.logs("decoder")


def test_python_client_sync_and_async_agree(services_e2b, media_dir):
    import asyncio

    from mmserve_core.client import AsyncChatClient, Audio, ChatClient, ChatDelta, Image

    msgs = [{"role": "user", "content": ["Look and listen", Image((media_dir / "blue_square.jpg").read_bytes()),
                                         Audio((media_dir / "tone_1p3s.flac").read_bytes())]}]
    kw = dict(max_tokens=6, temperature=0, logit_bias=NO_EOS, logprobs=True, top_logprobs=2)
    with ChatClient(services_e2b.chat_addr) as c:
        sync = c.chat(msgs, **kw)
        streamed = [m for m in c.stream(msgs, **kw)]

    async def run():
        async with AsyncChatClient(services_e2b.chat_addr) as c:
            unary = await c.chat(msgs, **kw)
            deltas = [m async for m in c.stream(msgs, **kw)]
            return unary, deltas

    unary, deltas = asyncio.run(run())
    assert sync.token_ids == unary.token_ids and len(sync.token_ids) == 6 and sync.finish_reason == "length"
    for msgs_ in (streamed, deltas):
        assert [t for m in msgs_ if isinstance(m, ChatDelta) for t in m.token_ids] == sync.token_ids
        assert msgs_[-1].usage.soft_tokens == sync.usage.soft_tokens > 33  # 1.3 s of audio + the image
    assert [lp.token_id for lp in sync.logprobs] == sync.token_ids and len(sync.logprobs[0].top) == 2


def test_async_low_level_clients_match_sync(services_e2b):
    import asyncio

    from mmserve_core.client import (
        AsyncDecoderClient,
        AsyncEncoderClient,
        DecoderClient,
        EncoderClient,
        TokenEvent,
    )

    png = shape_png("yellow", "circle", (50, 50))
    enc, dec = EncoderClient(services_e2b.encoder_addr), DecoderClient(services_e2b.decoder_addr)
    image = enc.encode_image(png, soft_tokens=70)
    info = dec.model_info()
    img = info.media_tokens[image.modality]
    ids = [2, 105, img.begin] + [img.placeholder] * image.rows.shape[0] + [img.end, 106, 105]
    sync = [t for r in dec.generate(ids, [(3, image)], max_tokens=6, temperature=0) if isinstance(r, TokenEvent)
            for t in r.token_ids]

    async def run():
        aenc, adec = AsyncEncoderClient(services_e2b.encoder_addr), AsyncDecoderClient(services_e2b.decoder_addr)
        again = await aenc.encode_image(png, soft_tokens=70)
        toks = [t async for r in adec.generate(ids, [(3, again)], max_tokens=6, temperature=0)
                if isinstance(r, TokenEvent) for t in r.token_ids]
        await aenc.close()
        await adec.close()
        return again, toks

    again, toks = asyncio.run(run())
    assert again.content_hash == image.content_hash and (again.rows == image.rows).all()
    assert toks == sync and len(sync) > 0

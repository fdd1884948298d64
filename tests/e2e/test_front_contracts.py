"""What every front owes its client whatever the decoder does, checked on all five at once.

A stand-in decoder (a gRPC server in this process, its model facts from the real one) misbehaves on
purpose: with ``max_tokens == 7`` it sends one token and ends the stream **without** its final
message; otherwise it streams tokens until it is cancelled, counting the streams it has open.
Through a real gateway process:

* a stream that ends without its ``Done`` is the same error class on every front — 502 in each HTTP
  API's own error shape (an ``error`` event once a stream has begun), ``UNAVAILABLE`` on the typed
  gRPC API;
* a client that goes away — streamed or not, on every front — cancels its decoder stream (the
  stand-in's open streams drop to zero).
"""

from __future__ import annotations

import io
import threading
import time
from concurrent import futures

import grpc
import httpx
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.processes import start_gateway
from mmserve_core.wire.stubs import chat_pb2, chat_pb2_grpc, decoder_pb2, decoder_pb2_grpc

pytestmark = pytest.mark.e2e
NO_DONE = 7


class StandIn(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, real: str) -> None:
        self.real = decoder_pb2_grpc.DecoderServiceStub(grpc.insecure_channel(real))
        self.open = 0
        self.lock = threading.Lock()

    def GetModelInfo(self, request, context):
        return self.real.GetModelInfo(request, timeout=10)

    def Generate(self, request_iterator, context):
        setup = next(request_iterator).setup
        for _ in request_iterator:
            pass
        token = decoder_pb2.GenerateResponse(token=decoder_pb2.TokenChunk(token_ids=[300], text="a"))
        if setup.sampling.max_tokens == NO_DONE:
            yield token
            return  # no GenerateComplete
        with self.lock:
            self.open += 1
        try:
            while context.is_active():
                yield token
                time.sleep(0.02)
        finally:
            with self.lock:
                self.open -= 1


@pytest.fixture(scope="module")
def gateway(services_e2b):
    stand_in = StandIn(services_e2b.decoder_addr)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    decoder_pb2_grpc.add_DecoderServiceServicer_to_server(stand_in, server)
    h = health.HealthServicer()
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, f"127.0.0.1:{port}") as gw:
            yield gw, stand_in
    finally:
        server.stop(0)


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 16000, format="WAV")
    return buf.getvalue()


def _requests(max_tokens: int, stream: bool) -> dict[str, dict]:
    """Per front: the httpx request (method, path, and json or multipart)."""
    msgs = [{"role": "user", "content": "hi"}]
    out = {
        "chat": {"url": "/v1/chat/completions", "json": {"messages": msgs, "max_tokens": max_tokens, "stream": stream}},
        "anthropic": {"url": "/v1/messages", "json": {"model": "m", "messages": msgs, "max_tokens": max_tokens,
                                                      "stream": stream}},
        "responses": {"url": "/v1/responses", "json": {"input": "hi", "max_output_tokens": max_tokens,
                                                       "stream": stream}},
    }
    return out


def _transcription(client: httpx.Client, stream: bool, **kw):
    return client.post("/v1/audio/transcriptions", files={"file": ("a.wav", _wav(), "audio/wav")},
                       data={"stream": "true" if stream else "false"}, **kw)


def test_a_stream_without_done_is_the_same_error_on_every_front(gateway):
    gw, _ = gateway
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.gateway_port}", timeout=60) as c:
        for front, r in _requests(NO_DONE, stream=False).items():
            resp = c.post(r["url"], json=r["json"])
            assert resp.status_code == 502, (front, resp.text)
            body = resp.json()
            if front == "anthropic":
                assert body["type"] == "error" and body["error"]["type"] == "api_error", body
            else:
                assert body["error"]["code"] == "upstream_incomplete", body
        for front, r in _requests(NO_DONE, stream=True).items():
            text = c.post(r["url"], json=r["json"]).text
            assert "error" in text and "decoder stream ended without a completion" in text, (front, text[-400:])
    # transcription: its clip bounds max_tokens, so it is checked with the stand-in's endless mode below;
    # the typed gRPC API:
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(gw.chat_addr))
    chat = chat_pb2.ChatRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[
        chat_pb2.Part(text="hi")])], params=chat_pb2.ChatParams(max_tokens=NO_DONE))
    for call in (lambda: stub.CompleteUnary(chat_pb2.CompleteUnaryRequest(chat=chat), timeout=30),
                 lambda: list(stub.Complete(chat_pb2.CompleteRequest(chat=chat), timeout=30))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value


# Generous: on 2 busy vCPUs a request took over 10 s to reach the stand-in (seen on this commit and the
# one before it, under load); what is tested is that the stream is cancelled, not how fast.
SETTLE_S = 30


def _drops(stand_in: StandIn, what: str) -> None:
    deadline = time.time() + SETTLE_S
    while stand_in.open and time.time() < deadline:
        time.sleep(0.05)
    assert stand_in.open == 0, f"{what}: the decoder stream was not cancelled"


def _opened(stand_in: StandIn) -> None:
    deadline = time.time() + SETTLE_S
    while not stand_in.open and time.time() < deadline:
        time.sleep(0.02)
    assert stand_in.open == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_cancels_decoding_on_every_front(gateway, stream):
    gw, stand_in = gateway
    base = f"http://127.0.0.1:{gw.gateway_port}"
    cases = {front: (lambda c, r=r: c.post(r["url"], json=r["json"])) for front, r in _requests(500, stream).items()}
    cases["transcription"] = lambda c: _transcription(c, stream)
    for front, send in cases.items():
        client = httpx.Client(base_url=base, timeout=httpx.Timeout(60, read=5))
        worker = threading.Thread(target=_swallow, args=(send, client), daemon=True)
        worker.start()
        _opened(stand_in)
        client.close()  # the client goes away mid-request
        _drops(stand_in, f"{front} (stream={stream})")
        worker.join(5)
    # the typed gRPC API: a cancelled call
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(gw.chat_addr))
    chat = chat_pb2.ChatRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[
        chat_pb2.Part(text="hi")])], params=chat_pb2.ChatParams(max_tokens=500))
    fut = (stub.Complete(chat_pb2.CompleteRequest(chat=chat)) if stream
           else stub.CompleteUnary.future(chat_pb2.CompleteUnaryRequest(chat=chat)))
    _opened(stand_in)
    fut.cancel()
    _drops(stand_in, f"grpc (stream={stream})")


def _swallow(send, client) -> None:
    try:
        send(client)
    except Exception:  # noqa: BLE001 - the client is closed under the request on purpose
        pass


def test_the_stand_in_is_not_vacuous(gateway):
    """A client that stays gets tokens until its own max_tokens... the stand-in never ends by itself."""
    gw, stand_in = gateway
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.gateway_port}", timeout=5) as c:
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 500, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 20:
                    break
            assert stand_in.open == 1
    _drops(stand_in, "chat stream closed by its reader")

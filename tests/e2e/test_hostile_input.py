"""Hostile input across the HTTP JSON, the media bytes and the raw RPC fields.

Every case must get a 4xx (HTTP) or an INVALID_ARGUMENT-class status (gRPC)
with a message — never a 5xx — and every service must still be SERVING
afterwards.
"""

from __future__ import annotations

import base64
import json
import re

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.demo.media import shape_png, tone_wav
from mmserve_core.wire.stubs import decoder_pb2, decoder_pb2_grpc, tensor_pb2
from tests.e2e.hostile_video import video_cases

pytestmark = pytest.mark.e2e
B64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
PNG, WAV, FLAC = shape_png(size=(32, 32)), tone_wav(0.3, 16000), tone_wav(0.3, 16000, fmt="FLAC")
U = lambda content: {"messages": [{"role": "user", "content": content}]}  # noqa: E731
IMG = lambda url: U([{"type": "image_url", "image_url": {"url": url}}])  # noqa: E731
AUD = lambda data, fmt: U([{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}])  # noqa: E731

HTTP_CASES = [
    ("not JSON", b"{nope", None),
    ("JSON array body", b"[1, 2]", None),
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, None),
    ("no messages", {}, None),
    ("empty messages", {"messages": []}, None),
    ("messages not a list", {"messages": "hi"}, None),
    ("message not an object", {"messages": ["hi"]}, None),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, None),
    ("content is a number", U(5), None),
    ("part not an object", U(["x"]), None),
    ("unknown part type", U([{"type": "video", "video": {}}]), None),
    ("text not a string", U([{"type": "text", "text": 7}]), None),
    ("image_url without url", U([{"type": "image_url", "image_url": {}}]), None),
    ("image URL while fetching is off", IMG("http://127.0.0.1:9/x.png"), None),
    ("data URI not base64", IMG("data:image/png,abc"), None),
    ("data URI bad base64", IMG("data:image/png;base64,@@@@"), None),
    ("data URI wrong media type", IMG("data:text/plain;base64," + B64(b"hello")), None),
    ("corrupt PNG", IMG("data:image/png;base64," + B64(PNG[:100])), None),
    ("random bytes as image", IMG("data:image/png;base64," + B64(np.random.default_rng(0).bytes(999))), None),
    ("image in an assistant turn", {"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64(PNG)}}]}]}, None),
    ("audio without data", U([{"type": "input_audio", "input_audio": {"format": "wav"}}]), None),
    ("audio format unknown", AUD(B64(WAV), "aac"), None),
    ("audio format lies", AUD(B64(FLAC), "wav"), None),
    ("random bytes as audio", AUD(B64(np.random.default_rng(1).bytes(999)), "wav"), None),
    ("truncated WAV", AUD(B64(WAV[: len(WAV) // 2]), "wav"), None),
    ("max_tokens a string", {**U("x"), "max_tokens": "9"}, None),
    ("max_tokens zero", {**U("x"), "max_tokens": 0}, None),
    ("absurd max_tokens", {**U("x"), "max_tokens": 10**12}, None),
    ("temperature 5", {**U("x"), "temperature": 5}, None),
    ("top_p zero", {**U("x"), "top_p": 0}, None),
    ("n = 3", {**U("x"), "n": 3}, None),
    ("logit_bias out of range", {**U("x"), "logit_bias": {"5": 500}}, None),
    ("logit_bias key not an id", {**U("x"), "logit_bias": {"abc": 1}}, None),
    ("logit_bias id outside the vocabulary", {**U("x"), "logit_bias": {"1000000000": 1}}, None),
    ("five stop strings", {**U("x"), "stop": ["a", "b", "c", "d", "e"]}, None),
    ("top_logprobs without logprobs", {**U("x"), "top_logprobs": 3}, None),
    ("stream not a boolean", {**U("x"), "stream": "yes"}, None),
    ("seed a float", {**U("x"), "seed": 1.5}, None),
    ("seed beyond 64 bits", {**U("x"), "seed": 2**64}, None),
    ("seed below int64", {**U("x"), "seed": -(2**63) - 1}, None),
    ("top_k beyond int32", {**U("x"), "top_k": 2**31}, None),
    ("unknown model", {**U("x"), "model": "gpt-4o"}, None),
    ("tools not a list", {**U("x"), "tools": {"type": "function"}}, None),
    ("tool without a function", {**U("x"), "tools": [{"type": "function"}]}, None),
    ("tool name with a control token", {**U("x"), "tools": [{"type": "function", "function": {"name": "<|turn>"}}]},
     None),
    ("tool declared twice", {**U("x"), "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, None),
    ("tool parameters a list", {**U("x"), "tools": [{"type": "function", "function": {"name": "f",
                                                                                     "parameters": [1]}}]}, None),
    ("forced tool with a $ref schema", {**U("x"), "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/x"}}}}}]}, None),
    ("forced tool with maxItems below minItems", {**U("x"), "tool_choice": "required", "tools": [{
        "type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "array", "minItems": 3, "maxItems": 1}}, "required": ["x"]}}}]}, None),
    ("forced tool with a 20-deep schema", {**U("x"), "tool_choice": "required", "tools": [{
        "type": "function", "function": {"name": "f", "parameters": json.loads(
            '{"type":"object","properties":{"x":' * 20 + '{"type":"string"}' + "}}" * 20)}}]}, "ok-or-4xx"),
    ("forced tool with a 400-deep schema", {**U("x"), "tool_choice": "required", "tools": [{
        "type": "function", "function": {"name": "f", "parameters": json.loads(
            '{"type":"object","properties":{"x":' * 400 + '{"type":"string"}' + "}}" * 400)}}]}, None),
    ("tools with a 400-deep schema", {**U("x"), "tools": [{
        "type": "function", "function": {"name": "f", "parameters": json.loads(
            '{"type":"object","properties":{"x":' * 400 + '{"type":"string"}' + "}}" * 400)}}]}, None),
    ("tool_choice names nothing declared", {**U("x"), "tools": [{"type": "function", "function": {"name": "f"}}],
                                            "tool_choice": {"type": "function", "function": {"name": "g"}}}, None),
    ("tool_choice required without tools", {**U("x"), "tool_choice": "required"}, None),
    ("tool result with no call before it", {"messages": [{"role": "tool", "tool_call_id": "c", "content": "r"}]},
     None),
    ("tool result with media", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64(PNG)}}]}]}, None),
    ("call arguments not JSON", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]}, None),
    ("call ids repeated", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}] * 2}]}, None),
    ("parallel_tool_calls a string", {**U("x"), "parallel_tool_calls": "no"}, None),
    ("legacy functions field", {**U("x"), "functions": [{"name": "f"}]}, None),
    ("response_format of an unknown type", {**U("x"), "response_format": {"type": "yaml"}}, None),
    ("response_format schema not an object", {**U("x"), "response_format": {"type": "json_schema",
                                                                            "json_schema": {"schema": 3}}}, None),
    ("response_format schema with a look-ahead pattern", {**U("x"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "(?=a)b"}}}}, None),
    ("an unknown body field", {**U("x"), "frobnicate": 1}, None),
    ("an unknown message field", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, None),
    ("model not a string", {**U("x"), "model": 7}, None),
    ("reserved template kwarg", {**U("x"), "chat_template_kwargs": {"messages": []}}, None),
    ("10 000 messages", {"messages": [{"role": "user", "content": "hello there"}] * 10_000}, None),
    ("lone surrogate in text", b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 1}',
     "ok-or-4xx"),
    ("1 GB declared body", "declared", None),
]


def _post(url: str, body, name: str) -> httpx.Response:
    if body == "declared":  # headers that promise 1 GB, then a few bytes: answered from the headers alone
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(url)
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(f"POST {u.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {1 << 30}\r\n\r\n{{}}".encode())
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                    re.search(rb"content-length: (\d+)", data.lower()).group(1) if b"content-length" in data.lower()
                    else 0):
                more = s.recv(65536)
                if not more:
                    break
                data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        return httpx.Response(int(head.split()[1]), content=rest)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=60)


def _all_serving(svc) -> None:
    assert httpx.get(svc.base_url.replace("/v1", "") + "/health", timeout=10).json()["status"] == "ok"
    for addr in (svc.encoder_addr, svc.decoder_addr):
        with grpc.insecure_channel(addr) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name,body,expect", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_hostile(services_e2b, name, body, expect):
    try:
        r = _post(services_e2b.base_url + "/chat/completions", body, name)
    except httpx.RemoteProtocolError:
        r = None  # the server may close a connection that declared 1 GB; it must not crash
    if r is not None:
        if expect == "ok-or-4xx":
            assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]
        else:
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["type"]
    _all_serving(services_e2b)


AM = lambda content: {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}  # noqa: E731
RI = lambda items: {"model": "m", "max_output_tokens": 4, "input": items}  # noqa: E731
# (name, path, body): the Anthropic, Responses and transcription fronts
FRONT_CASES = [
    ("messages: not JSON", "/messages", b"{x"),
    ("messages: no max_tokens", "/messages", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    ("messages: empty messages", "/messages", {"model": "m", "max_tokens": 4, "messages": []}),
    ("messages: role system in messages", "/messages", {"model": "m", "max_tokens": 4,
                                                        "messages": [{"role": "system", "content": "x"}]}),
    ("messages: unknown block", "/messages", AM([{"type": "document", "source": {}}])),
    ("messages: image bad base64", "/messages", AM([{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "@@@"}}])),
    ("messages: image wrong media type", "/messages", AM([{"type": "image", "source": {
        "type": "base64", "media_type": "text/html", "data": B64(PNG)}}])),
    ("messages: corrupt PNG", "/messages", AM([{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": B64(PNG[:60])}}])),
    ("messages: image URL while fetching is off", "/messages", AM([{"type": "image", "source": {
        "type": "url", "url": "http://127.0.0.1:9/x.png"}}])),
    ("messages: audio lies about its type", "/messages", AM([{"type": "audio", "source": {
        "type": "base64", "media_type": "audio/flac", "data": B64(WAV)}}])),
    ("messages: tool_result for no call", "/messages", AM([{"type": "tool_result", "tool_use_id": "t", "content": "r"}])),
    ("messages: tool_result after text", "/messages", {"model": "m", "max_tokens": 4, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "text", "text": "x"},
                                     {"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]}),
    ("messages: tool_use input a list", "/messages", {"model": "m", "max_tokens": 4, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]}),
    ("messages: server tool", "/messages", {**AM("x"), "tools": [{"type": "web_search_20250305", "name": "w"}]}),
    ("messages: tool_choice names nothing", "/messages", {**AM("x"), "tools": [
        {"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "g"}}),
    ("messages: thinking budget too small", "/messages", {**AM("x"), "thinking": {"type": "enabled",
                                                                                  "budget_tokens": 5}}),
    ("messages: temperature 2", "/messages", {**AM("x"), "temperature": 2}),
    ("messages: stop_sequences a string", "/messages", {**AM("x"), "stop_sequences": "x"}),
    ("messages: metadata with extra keys", "/messages", {**AM("x"), "metadata": {"user_id": "u", "x": 1}}),
    ("messages: unknown model", "/messages", {**AM("x"), "model": "claude-x"}),
    ("count_tokens: sampling fields", "/messages/count_tokens", {**AM("x")}),
    ("responses: not JSON", "/responses", b"[1"),
    ("responses: no input", "/responses", {"model": "m"}),
    ("responses: unknown item type", "/responses", RI([{"type": "computer_call"}])),
    ("responses: call arguments not JSON", "/responses", RI([{"type": "function_call", "call_id": "c",
                                                              "name": "f", "arguments": "{x"}])),
    ("responses: output_text in a user turn", "/responses", RI([{"role": "user", "content": [
        {"type": "output_text", "text": "x"}]}])),
    ("responses: input_image bad data URI", "/responses", RI([{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,@@"}]}])),
    ("responses: hosted tool", "/responses", {**RI("x"), "tools": [{"type": "file_search"}]}),
    ("responses: reasoning effort unknown", "/responses", {**RI("x"), "reasoning": {"effort": "max"}}),
    ("responses: metadata too many keys", "/responses", {**RI("x"), "metadata": {str(i): "v" for i in range(17)}}),
    ("responses: previous id unknown", "/responses", {**RI("x"), "previous_response_id": "resp_x"}),
    ("responses: input_video not a video", "/responses", RI([{"role": "user", "content": [
        {"type": "input_video", "video_url": "data:video/mp4;base64," + B64(PNG), "audio_track": False}]}])),
    ("responses: input_video option unknown", "/responses", RI([{"role": "user", "content": [
        {"type": "input_video", "video_url": "data:video/mp4;base64,AAAA", "loop": True}]}])),
    ("messages: video block wrong media type", "/messages", AM([{"type": "video", "source": {
        "type": "base64", "media_type": "audio/wav", "data": B64(WAV)}}])),
    ("messages: video block of random bytes", "/messages", AM([{"type": "video", "source": {
        "type": "base64", "media_type": "video/mp4", "data": B64(np.random.default_rng(5).bytes(800))},
        "audio_track": False}])),
    ("transcriptions: JSON body", "/audio/transcriptions", {"file": "x"}),
]


VIDEO_HTTP_CASES = [
    ("video_url without url", U([{"type": "video_url", "video_url": {}}])),
    ("video_url a string", U([{"type": "video_url", "video_url": "data:video/mp4;base64,AAAA"}])),
    ("video data URI wrong media type", U([{"type": "video_url", "video_url": {
        "url": "data:text/plain;base64," + B64(b"hello")}}])),
    ("video data URI bad base64", U([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@"}}])),
    ("video URL while fetching is off", U([{"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/v.mp4"}}])),
    ("video option unknown", U([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA", "start": 3}}])),
    ("video fps NaN-like string", U([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA",
                                                                        "fps": "NaN"}}])),
    ("video in an assistant turn", {"messages": [{"role": "assistant", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}),
]


@pytest.mark.parametrize("name,body", VIDEO_HTTP_CASES, ids=[c[0] for c in VIDEO_HTTP_CASES])
def test_http_hostile_video_parts(services_e2b, name, body):
    r = _post(services_e2b.base_url + "/chat/completions", body, name)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json()["error"]["param"]
    _all_serving(services_e2b)


@pytest.mark.parametrize("case", video_cases(), ids=[c[0] for c in video_cases()])
def test_http_hostile_videos(services_e2b, case):
    """The shared video corpus through the chat front: each a 200 or a 400 naming the part, as expected."""
    name, data, options, expect = case
    body = {**U([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + B64(data), **options}}]),
            "max_tokens": 2}
    r = _post(services_e2b.base_url + "/chat/completions", body, name)
    if expect == "ok" or (expect == "either" and r.status_code == 200):
        assert r.status_code == 200, r.text[:300]
    else:
        assert r.status_code == 400, (r.status_code, r.text[:300])
        assert r.json()["error"]["param"].startswith("messages[0].content[0]")
    _all_serving(services_e2b)


@pytest.mark.parametrize("name,path,body", FRONT_CASES, ids=[c[0] for c in FRONT_CASES])
def test_other_fronts_hostile(services_e2b, name, path, body):
    """4xx in the front's own error shape (Anthropic's for /v1/messages), never a 5xx."""
    r = _post(services_e2b.base_url + path, body, name)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()
    if path.startswith("/messages"):
        assert err["type"] == "error" and err["error"]["type"] and err["error"]["message"]
    else:
        assert err["error"]["message"] and err["error"]["type"]
    _all_serving(services_e2b)


def _setup(ids, spans=(), **sampling):
    return decoder_pb2.GenerateSetup(prompt_token_ids=ids, spans=list(spans),
                                     sampling=decoder_pb2.SamplingParams(**({"max_tokens": 2} | sampling)))


def _span(offset, length, rows=None, hidden=64, dtype=tensor_pb2.DTYPE_BFLOAT16, modality=tensor_pb2.MODALITY_IMAGE):
    return decoder_pb2.EmbeddingSpan(
        placement=tensor_pb2.PlaceholderSpan(offset=offset, length=length, modality=modality),
        tensor=tensor_pb2.TensorSpec(dtype=dtype, shape=[rows if rows is not None else length, hidden]))


def _chunk(i, off, n):
    return decoder_pb2.EmbeddingChunk(span_index=i, byte_offset=off, data=b"\0" * n)


P = [2, 105, 10, 250] + [252] * 4 + [254, 106, 105]
RPC_CASES = [
    ("empty prompt", _setup([]), []),
    ("token id outside the vocabulary", _setup([2, 10**6]), []),
    ("negative token id", _setup([2, -5]), []),
    ("absurd max_tokens", _setup([2, 10], max_tokens=4_000_000_000), []),
    ("placeholders without a span", _setup(P), []),
    ("span past the end", _setup(P, [_span(9, 8)]), [_chunk(0, 0, 8 * 128)]),
    ("span over text ids", _setup(P, [_span(1, 4)]), [_chunk(0, 0, 4 * 128)]),
    ("overlapping spans", _setup(P, [_span(4, 3), _span(5, 3)]), [_chunk(0, 0, 384), _chunk(1, 0, 384)]),
    ("length disagrees with rows", _setup(P, [_span(4, 4, rows=5)]), [_chunk(0, 0, 5 * 128)]),
    ("wrong hidden size", _setup(P, [_span(4, 4, hidden=63)]), [_chunk(0, 0, 4 * 126)]),
    ("dtype unspecified", _setup(P, [_span(4, 4, dtype=tensor_pb2.DTYPE_UNSPECIFIED)]), [_chunk(0, 0, 512)]),
    ("audio span on an image placeholder", _setup(P, [_span(4, 4, modality=tensor_pb2.MODALITY_AUDIO)]),
     [_chunk(0, 0, 512)]),
    ("chunks stop short", _setup(P, [_span(4, 4)]), [_chunk(0, 0, 100)]),
    ("chunk for an unknown span", _setup(P, [_span(4, 4)]), [_chunk(3, 0, 512)]),
    ("more bytes than declared", _setup(P, [_span(4, 4)]), [_chunk(0, 0, 512), _chunk(0, 512, 8)]),
    ("chunk at the wrong offset", _setup(P, [_span(4, 4)]), [_chunk(0, 64, 448)]),
    ("top_p out of range", _setup([2, 10], top_p=1.5), []),
    ("negative temperature", _setup([2, 10], temperature=-1), []),
]


@pytest.mark.parametrize("name,setup,chunks", RPC_CASES, ids=[c[0] for c in RPC_CASES])
def test_raw_decoder_rpc_hostile(services_e2b, name, setup, chunks):
    def reqs():
        yield decoder_pb2.GenerateRequest(setup=setup)
        for c in chunks:
            yield decoder_pb2.GenerateRequest(chunk=c)

    with grpc.insecure_channel(services_e2b.decoder_addr) as ch, pytest.raises(grpc.RpcError) as ei:
        list(decoder_pb2_grpc.DecoderServiceStub(ch).Generate(reqs(), timeout=30))
    assert ei.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                               grpc.StatusCode.OUT_OF_RANGE), (ei.value.code(), ei.value.details())
    assert ei.value.details()
    _all_serving(services_e2b)


def test_corpus_is_large_enough():
    assert len(HTTP_CASES) + len(RPC_CASES) >= 40

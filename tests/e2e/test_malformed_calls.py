"""Regression tests for the calls that used to answer INTERNAL / 500 (each failed before its fix).

1. top_k at or above the vocabulary, 2. EXIF orientation beside a malformed tag,
3. corrupt protobuf on the Generate stream, 4. a decoder refusal while the gateway
is still writing embedding chunks (100 tries, gRPC and HTTP), 5. half-open streams
(200 stalled: the cap, the memory, a normal request meanwhile), 6. a video
placeholder in a prompt, 7. HTTP seed beyond 64 bits and an unknown model.
"""

from __future__ import annotations

import asyncio
import base64
import re
import statistics
import time

import grpc
import httpx
import openai
import pytest

from deploy.demo.media import shape_png, tone_wav
from deploy.processes import start_decoder, start_services
from mmserve_core.wire.stubs import chat_pb2, chat_pb2_grpc, decoder_pb2, encoder_pb2, tensor_pb2
from tests.e2e import hostile_rpc_cases as H
from tests.e2e import rpc_calls as R

pytestmark = pytest.mark.e2e


def _raw(addr: str, messages, path=R.GEN, timeout=30) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(addr) as ch:
        return R.raw_stream(R.Env(ch, ch, ch), "decoder", path, messages, timeout=timeout)


# ----------------------------------------------------------------------------- 1, 3, 6 at the decoder
@pytest.mark.parametrize("top_k", [R.V - 1, R.V, R.V + 1, 2**31 - 1])
def test_top_k_at_or_above_the_vocabulary_is_served_as_off(services_e2b, top_k):
    code, details = _raw(services_e2b.decoder_addr, [R.setup(top_k=top_k, temperature=1.0, seed=3, max_tokens=4)])
    assert code == grpc.StatusCode.OK, details


def test_top_k_above_the_vocabulary_over_http_and_chat_grpc(services_e2b):
    client = openai.OpenAI(base_url=services_e2b.base_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=1.0, seed=5, extra_body={"top_k": 100_000})
    same = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=1.0, seed=5, extra_body={"top_k": 0})
    assert r.choices[0].message.content == same.choices[0].message.content  # top_k >= V is no top-k at all
    with grpc.insecure_channel(services_e2b.chat_addr) as ch:
        reply = chat_pb2_grpc.ChatServiceStub(ch).CompleteUnary(R.chat_req(top_k=2**31 - 1, temperature=1.0))
    assert reply.final.usage.completion_tokens >= 1


@pytest.mark.parametrize("where", ["first", "after the setup", "after a setup with spans"])
def test_corrupt_protobuf_on_the_generate_stream_is_invalid_argument(services_e2b, where):
    bad = b"\x0a\xff\xff\xff\xff\x0f"
    msgs = {"first": [bad], "after the setup": [R.setup(), bad],
            "after a setup with spans": [R.setup(R.P, [R.span()]), bad]}[where]
    code, details = _raw(services_e2b.decoder_addr, msgs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid mmserve.decoder.v1.GenerateRequest" in details


def test_video_placeholder_in_a_prompt_is_refused(services_e2b):
    ids = [R.BOS, R.TURN, 10] + [R.VID_PH] * 3 + [R.EOT, R.TURN]
    code, details = _raw(services_e2b.decoder_addr, [R.setup(ids)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "video placeholder" in details and "outside any span" in details


# ----------------------------------------------------------------------------- 2 at the encoder
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_beside_a_malformed_tag_is_applied(services_e2b, fmt):
    data = R.with_exif(fmt, H.EXIF_BLOCKS["orientation 6 + StripOffsets as text"])
    with grpc.insecure_channel(services_e2b.encoder_addr) as ch:
        code, details = R.raw_unary(R.Env(ch, ch, ch), "encoder", R.ENC, R.enc_request([R.image_item(data)]),
                                    stream_out=True)
    assert code == grpc.StatusCode.OK, details


# ----------------------------------------------------------------------------- 7 over HTTP
def test_seed_beyond_64_bits_is_refused(services_e2b):
    for seed in (2**64, -(2**63) - 1, 10**30):
        r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": seed})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed"
    for seed in (2**64 - 1, -(2**63), -1):
        r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": seed})
        assert r.status_code == 200, r.text


def test_unknown_model_is_404_model_not_found(services_e2b):
    client = openai.OpenAI(base_url=services_e2b.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ei.value.body["code"] == "model_not_found" and ei.value.body["param"] == "model"
    for name in ("tiny-e2b", "m"):  # the id and an alias are served
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.model == "tiny-e2b"
    assert client.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with grpc.insecure_channel(services_e2b.chat_addr) as ch, pytest.raises(grpc.RpcError) as ei:
        chat_pb2_grpc.ChatServiceStub(ch).CompleteUnary(R.chat_req(model="gpt-4o"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "gpt-4o" in ei.value.details()


@pytest.mark.parametrize("field,value", [("tool_choice", "required"), ("functions", [{"name": "f"}]),
                                         ("function_call", "auto"), ("frobnicate", 1)])
def test_a_field_the_server_cannot_honour_is_refused_by_name(services_e2b, field, value):
    """Rule 2: never accepted without effect (tools are honoured now; a forced call with no tools to
    call, the legacy function fields and unknown ones are refused)."""
    r = httpx.post(services_e2b.base_url + "/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


# ----------------------------------------------------------------------------- 4 through the gateway
@pytest.fixture(scope="module")
def short_context(ckpt_e2b):
    """A decoder whose context (512) a request of twelve 3 s clips (900 soft tokens) overflows."""
    with start_services(ckpt_e2b, decoder_args=["--context-length", "512"]) as svc:
        yield svc


CLIPS = [tone_wav(3.0, 16000, 200.0 + 50 * i) for i in range(12)]


def test_a_refusal_while_chunks_are_in_flight_keeps_its_status(short_context):
    """100 tries each way: the decoder refuses the setup (prompt over the context) while the gateway
    has eleven more embedding chunks to write; every try must see the decoder's INVALID_ARGUMENT."""
    http_parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(c).decode(), "format": "wav"}}
                  for c in CLIPS] + [{"type": "text", "text": "what are these?"}]
    grpc_parts = [chat_pb2.Part(audio=chat_pb2.AudioPart(data=c, format="wav")) for c in CLIPS] + \
        [chat_pb2.Part(text="what are these?")]
    statuses, http_codes = [], []
    with grpc.insecure_channel(short_context.chat_addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        for _ in range(100):
            try:
                stub.CompleteUnary(R.chat_req(R.user(*grpc_parts), max_tokens=4), timeout=60)
                statuses.append("OK")
            except grpc.RpcError as e:
                statuses.append(e.code().name)
                assert e.code() != grpc.StatusCode.INVALID_ARGUMENT or "context length" in e.details(), e.details()
    with httpx.Client(timeout=60) as http:
        for _ in range(100):
            r = http.post(short_context.base_url + "/chat/completions", json={
                "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": http_parts}]})
            http_codes.append(r.status_code)
            assert r.status_code != 400 or "context length" in r.json()["error"]["message"]
    assert statuses == ["INVALID_ARGUMENT"] * 100, {s: statuses.count(s) for s in set(statuses)}
    assert http_codes == [400] * 100, {s: http_codes.count(s) for s in set(http_codes)}


# ----------------------------------------------------------------------------- 5 half-open streams
STALLED, ROWS = 200, 4000  # each stalled stream declares 4000 float32 rows (1,024,000 bytes) and sends half


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _metric(svc, name: str) -> float:
    url = re.search(r"metrics listening\s+address=(\S+)", svc.logs("decoder")).group(1)
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(url, timeout=5).text, re.M).group(1))


NO_EOS = {1: -100.0, 106: -100.0, 50: -100.0}
_ENDED = (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError)


async def _timed_generate(method) -> tuple[float, list[int]]:
    """A normal 32-token text request on a raw stream_stream method: (seconds, token ids)."""
    async def one():
        yield R.setup(max_tokens=32, temperature=0.0, logit_bias=NO_EOS).SerializeToString()

    t0 = time.perf_counter()
    tokens: list[int] = []
    async for raw in method(one()):
        msg = decoder_pb2.GenerateResponse.FromString(raw)
        if msg.WhichOneof("payload") == "token":
            tokens += msg.token.token_ids
    return time.perf_counter() - t0, tokens


async def _stall(channel, setup_msg, half: bytes, results: list, hold_s: float) -> None:
    """Send the setup and half the declared rows, then go quiet; record how the call ended."""
    call = channel.stream_stream(R.GEN)()
    try:
        await call.write(setup_msg.SerializeToString())
        await call.initial_metadata()
        if not call.done():
            await call.write(decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(
                span_index=0, byte_offset=0, data=half)).SerializeToString())
    except _ENDED:
        pass
    try:
        results.append((await asyncio.wait_for(call.code(), hold_s)).name)
    except asyncio.TimeoutError:
        results.append("still open")
        call.cancel()


def test_200_stalled_streams(ckpt_e2b):
    """200 streams that declare 1 MB of rows, send half and go quiet: the byte cap refuses the next
    one, a normal request meanwhile completes as usual, and after the idle timeout every stalled
    stream has ended with DEADLINE_EXCEEDED and the decoder's memory is back where it started."""
    per_stream = ROWS * 64 * 4
    args = ["--stream-idle-timeout-s", "6", "--max-buffered-bytes", str(STALLED * per_stream),
            "--metrics-port", "0"]
    ids = [R.BOS, R.TURN, 10, R.BOI] + [R.IMG_PH] * ROWS + [R.EOI, R.EOT, R.TURN]
    big = R.setup(ids, [R.span(length=ROWS, dtype=tensor_pb2.DTYPE_FLOAT32)])
    half = b"\x00" * (per_stream // 2)

    async def scenario(svc) -> dict:
        channels = [grpc.aio.insecure_channel(svc.decoder_addr) for _ in range(4)]
        plain = channels[0].stream_stream(R.GEN)
        before = [await _timed_generate(plain) for _ in range(3)]
        rss0 = _rss(svc.procs["decoder"].pid)
        results: list[str] = []
        tasks = [asyncio.create_task(_stall(channels[i % 4], big, half, results, 30.0)) for i in range(STALLED)]
        deadline = time.time() + 20
        while _metric(svc, "mmserve_decoder_open_streams") < STALLED and time.time() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        held = {"open": _metric(svc, "mmserve_decoder_open_streams"),
                "reserved": _metric(svc, "mmserve_decoder_stream_reserved_bytes"),
                "rss": _rss(svc.procs["decoder"].pid)}
        over = channels[1].stream_stream(R.GEN)()
        await over.write(big.SerializeToString())
        over_code = await over.code()
        during = await _timed_generate(plain)
        await asyncio.gather(*tasks)
        await asyncio.sleep(2.0)  # the freed heap goes back to the OS within a second of the last release
        after = {"open": _metric(svc, "mmserve_decoder_open_streams"),
                 "reserved": _metric(svc, "mmserve_decoder_stream_reserved_bytes"),
                 "rss": _rss(svc.procs["decoder"].pid)}
        for c in channels:
            await c.close()
        return dict(before=before, during=during, rss0=rss0, held=held, over=over_code, after=after,
                    results=results)

    with start_decoder(ckpt_e2b, args) as svc:
        r = asyncio.run(scenario(svc))
    usual = statistics.median(t for t, _ in r["before"])
    print(f"\nstalled={STALLED} open={r['held']['open']:.0f} reserved={r['held']['reserved'] / 1e6:.1f} MB; "
          f"RSS baseline {r['rss0'] / 1e6:.1f} MB, held {r['held']['rss'] / 1e6:.1f} MB, after the idle "
          f"timeout {r['after']['rss'] / 1e6:.1f} MB; 32-token request {usual * 1000:.0f} ms usually, "
          f"{r['during'][0] * 1000:.0f} ms meanwhile; next stream: {r['over'].name}")
    assert r["held"]["open"] == STALLED and r["held"]["reserved"] == STALLED * per_stream
    assert r["held"]["rss"] > r["rss0"] + STALLED * per_stream // 2 * 0.8  # they really held the bytes
    assert r["over"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert r["during"][1] == r["before"][0][1]  # the normal request completed, same tokens
    assert r["results"] == ["DEADLINE_EXCEEDED"] * STALLED
    assert r["after"]["open"] == 0 and r["after"]["reserved"] == 0
    assert r["after"]["rss"] < r["rss0"] + 0.1 * (r["held"]["rss"] - r["rss0"]), r


def test_unknown_enum_values_name_their_field(services_e2b):
    with grpc.insecure_channel(services_e2b.encoder_addr) as ch:
        code, details = R.raw_unary(R.Env(ch, ch, ch), "encoder", R.ENC, encoder_pb2.EncodeRequest(
            items=[R.image_item(shape_png(size=(8, 8)))], output_dtype=42), stream_out=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "output_dtype = 42" in details

"""The RPC-level hostile corpus against the encoder, decoder and chat services (OS processes).

Every case must end with a clean status and a message (``hostile_rpc_cases``
says which codes are clean for it) — never ``INTERNAL`` or ``UNKNOWN`` —
and afterwards every service must be SERVING and answer one good call.
Property-based runs (hypothesis, derandomized so CI sees the same inputs)
fuzz media headers and sampling fields the same way.  The last test prints
the status counts per service.
"""

from __future__ import annotations

import collections
import re
import struct

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.demo.media import shape_png, tone_wav
from deploy.processes import start_services
from tests.e2e import hostile_rpc_cases as H
from tests.e2e import rpc_calls as R

pytestmark = pytest.mark.e2e
CASES = H.all_cases()
SEEN: dict[str, collections.Counter] = {"encoder": collections.Counter(), "decoder": collections.Counter(),
                                        "chat": collections.Counter()}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def svc(ckpt_e2b):
    with start_services(ckpt_e2b, decoder_args=["--stream-idle-timeout-s", "1", "--max-open-streams", "12",
                                                "--max-buffered-bytes", str(4 << 20), "--metrics-port", "0"]) as s:
        yield s


@pytest.fixture(scope="module")
def env(svc):
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    chans = [grpc.insecure_channel(a, options=opts) for a in (svc.encoder_addr, svc.decoder_addr, svc.chat_addr)]
    yield R.Env(*chans)
    for c in chans:
        c.close()


def _decoder_metric(svc, name: str) -> float:
    url = re.search(r"metrics listening\s+address=(\S+)", svc.logs("decoder")).group(1)
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(url, timeout=5).text, re.M).group(1))


def _good_call(env: R.Env, service: str) -> None:
    if service == "encoder":
        code, details = R.raw_unary(env, "encoder", R.ENC, R.enc_request([R.image_item(shape_png(size=(32, 32)))]),
                                    stream_out=True)
    elif service == "decoder":
        code, details = R.raw_stream(env, "decoder", R.GEN, [R.setup(max_tokens=2)])
    else:
        code, details = R.raw_unary(env, "chat", R.CHAT_UNARY, R.chat_req(), stream_out=False)
    assert code == grpc.StatusCode.OK, (service, code, details)


def _all_serving(env: R.Env) -> None:
    for ch in (env.encoder, env.decoder, env.chat):
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def _check(service: str, code: grpc.StatusCode, details: str, expect: frozenset) -> None:
    SEEN[service][code.name] += 1
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (code, details)
    assert code in expect, (code, details)
    if code != grpc.StatusCode.OK:
        assert details, "a refusal must say what was wrong"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.service}: {c.name}" for c in CASES])
def test_hostile_rpc(svc, env, case: H.Case):
    code, details = case.run(env)
    _check(case.service, code, details, case.expect)
    _all_serving(env)
    _good_call(env, case.service)


def test_streams_release_everything_they_held(svc, env):
    """After every stalled, cancelled and refused stream above: nothing open, nothing reserved."""
    _good_call(env, "decoder")
    assert _decoder_metric(svc, "mmserve_decoder_open_streams") == 0
    assert _decoder_metric(svc, "mmserve_decoder_stream_reserved_bytes") == 0
    assert _decoder_metric(svc, "mmserve_decoder_stream_idle_timeouts_total") >= 4


# ----------------------------------------------------------------------------- property-based
_PNG, _JPEG, _WAV = shape_png(size=(24, 24)), shape_png(size=(24, 24), fmt="JPEG"), tone_wav(0.25, 16000)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b)


_HEADER_EDITS = st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6)


@pytest.mark.parametrize("name,data,item", [("PNG", _PNG, R.image_item), ("JPEG", _JPEG, R.image_item),
                                            ("WAV", _WAV, R.audio_item)])
def test_fuzzed_media_headers(env, name, data, item):
    @FUZZ
    @given(edits=_HEADER_EDITS)
    def run(edits):
        code, details = R.raw_unary(env, "encoder", R.ENC, R.enc_request([item(_mutate(data, edits))]),
                                    stream_out=True)
        _check("encoder", code, details, H.OK_OR_REFUSED)

    run()
    _all_serving(env)
    _good_call(env, "encoder")


_F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def test_fuzzed_sampling_fields(env):
    @FUZZ
    @given(temperature=_F32, top_p=_F32, top_k=st.integers(-(2**31), 2**31 - 1), min_p=_F32,
           repetition_penalty=_F32, presence_penalty=_F32, frequency_penalty=_F32,
           seed=st.integers(0, 2**64 - 1), bias=st.dictionaries(st.integers(-(2**31), 2**31 - 1), _F32, max_size=3))
    def run(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, bias):
        code, details = R.raw_stream(env, "decoder", R.GEN, [R.setup(
            max_tokens=2, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, logit_bias=bias)])
        _check("decoder", code, details, H.OK_OR_REFUSED)

    run()
    _all_serving(env)
    _good_call(env, "decoder")


def test_fuzzed_chunk_streams(env):
    """Random sequences of chunks against a declared span: offsets, sizes and span indexes that lie."""
    @FUZZ
    @given(chunks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1024), st.integers(0, 1024)), max_size=5))
    def run(chunks):
        msgs = [R.setup(R.P, [R.span()])] + [R.chunk(i, off, n) for i, off, n in chunks]
        code, details = R.raw_stream(env, "decoder", R.GEN, msgs)
        _check("decoder", code, details, H.OK_OR_REFUSED)

    run()
    _all_serving(env)
    _good_call(env, "decoder")


def test_fuzzed_wav_fields(env):
    @FUZZ
    @given(rate=st.integers(0, 2**32 - 1), channels=st.integers(0, 65535), bits=st.sampled_from([0, 1, 8, 12, 16, 24,
                                                                                                 32, 64, 65535]),
           fmt_tag=st.sampled_from([0, 1, 3, 6, 7, 0xFFFE, 0x1234]))
    def run(rate, channels, bits, fmt_tag):
        try:
            wav = R.wav_with(rate=rate, channels=channels, bits=bits, fmt_tag=fmt_tag)
        except struct.error:  # a header field that does not fit its width: not sendable as a WAV
            return
        code, details = R.raw_unary(env, "encoder", R.ENC, R.enc_request([R.audio_item(wav)]), stream_out=True)
        _check("encoder", code, details, H.OK_OR_REFUSED)

    run()
    _all_serving(env)
    _good_call(env, "encoder")


def test_corpus_summary():
    """At least 150 distinct cases; no INTERNAL or UNKNOWN anywhere; counts printed per service."""
    assert len(CASES) >= 150, len(CASES)
    for service, counts in SEEN.items():
        print(f"\n{service}: {sum(counts.values())} calls: {dict(sorted(counts.items()))}")
        assert not counts["INTERNAL"] and not counts["UNKNOWN"], (service, counts)

"""Two encoders and two decoders behind one gateway: work spreads, and survives losing one of each."""

from __future__ import annotations

import base64
import re
import signal
import time

import httpx
import openai
import pytest

from deploy.demo.media import shape_png
from deploy.processes import start_decoder, start_encoder, start_gateway


@pytest.fixture(scope="module")
def pools(services_e2b):
    ckpt = services_e2b.checkpoint
    with start_encoder(ckpt) as enc2, start_decoder(ckpt) as dec2:
        encoders = f"{services_e2b.encoder_addr},{enc2.encoder_addr}"
        decoders = f"{services_e2b.decoder_addr},{dec2.decoder_addr}"
        with start_gateway(ckpt, encoders, decoders) as gw:
            yield {"url": f"http://127.0.0.1:{gw.gateway_port}", "enc2": enc2, "dec2": dec2}


def _calls(url: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'mmserve_gateway_upstream_calls_total\{address="([^"]+)",outcome="OK",service="(\w+)"\} '
                         r'([0-9.e+]+)', httpx.get(url + "/metrics").text):
        out[(m.group(2), m.group(1))] = float(m.group(3))
    return out


def _ask(url: str, i: int):
    img = base64.b64encode(shape_png(("red", "green", "blue")[i % 3], "circle", (40 + i, 40))).decode()
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": f"picture {i}"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}", "detail": "low"}}]}])


def test_requests_spread_over_both_of_each(pools):
    for i in range(6):
        assert _ask(pools["url"], i).usage.prompt_tokens_details.soft_tokens > 0
    calls = _calls(pools["url"])
    for service in ("encoder", "decoder"):
        used = {addr for (svc, addr), n in calls.items() if svc == service and n > 0}
        assert len(used) == 2, (service, calls)


def test_a_prompt_cache_key_pins_requests_to_one_decoder(pools):
    """Different conversations sharing a ``prompt_cache_key`` all go to one decoder (its prefix cache
    holds what they share); without the key, the same six spread over both (the test above)."""
    client = openai.OpenAI(base_url=pools["url"] + "/v1", api_key="x", max_retries=0)
    for key in ("tenant-a", "tenant-b"):
        before = _calls(pools["url"])
        for i in range(6):
            client.chat.completions.create(model="m", max_tokens=1, prompt_cache_key=key,
                                           messages=[{"role": "user", "content": f"question {i} of {key}"}])
        after = _calls(pools["url"])
        used = {addr for (svc, addr), n in after.items() if svc == "decoder" and n > before.get((svc, addr), 0)}
        assert len(used) == 1, (key, before, after)


def test_a_client_that_disconnects_cancels_its_stream(pools, services_e2b):
    with httpx.stream("POST", pools["url"] + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000, "stream": True,
            "logit_bias": {"1": -100, "106": -100, "50": -100}}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 10
    logs = ""
    while time.time() < deadline:
        logs = services_e2b.logs("decoder") + pools["dec2"].logs("decoder")
        if "generation cancelled" in logs:
            break
        time.sleep(0.1)
    assert "generation cancelled" in logs


def test_losing_one_of_each_still_serves(pools):
    pools["enc2"].procs["encoder"].send_signal(signal.SIGKILL)
    pools["dec2"].procs["decoder"].send_signal(signal.SIGKILL)
    pools["enc2"].procs["encoder"].wait()
    pools["dec2"].procs["decoder"].wait()
    for i in range(6):  # round-robin would have sent half of these to the dead ones
        assert _ask(pools["url"], 10 + i).choices[0].finish_reason in ("stop", "length")
    assert httpx.get(pools["url"] + "/health").json()["status"] == "ok"


def test_a_non_streaming_client_that_gives_up_cancels_too(pools, services_e2b):
    before = (services_e2b.logs("decoder") + pools["dec2"].logs("decoder")).count("generation cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(pools["url"] + "/v1/chat/completions", timeout=1.5, json={
            "messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000,
            "logit_bias": {"1": -100, "106": -100, "50": -100}})
    deadline = time.time() + 10
    while time.time() < deadline:
        now = (services_e2b.logs("decoder") + pools["dec2"].logs("decoder")).count("generation cancelled")
        if now > before:
            break
        time.sleep(0.1)
    assert now > before

"""Versions that meet cleanly: a decoder that lacks a capability gets no request needing it (503
naming it; others served); a decoder with another chat template is never routed to; the model id is
stable from the start; a prompt that cannot fit is refused before its media are encoded."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import httpx
import pytest

from deploy.demo.media import shape_png
from deploy.processes import start_decoder, start_gateway, wait_port_file
from tests.tooling import bench_scale_out as bench


@pytest.fixture(scope="module")
def withholding(services_e2b, tmp_path_factory):
    """A gateway in front of a decoder that does not declare "constraints" (it passes the rest
    through to the shared decoder): ``tests/tooling/withholding_decoder.py``."""
    port_file = tmp_path_factory.mktemp("withholding") / "port"
    proc = subprocess.Popen([sys.executable, "-m", "tests.tooling.withholding_decoder", "--target",
                             services_e2b.decoder_addr, "--drop", "constraints", "--port-file", str(port_file)])
    try:
        port = wait_port_file(port_file, proc, "the withholding decoder", timeout=30)
        with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, f"127.0.0.1:{port}") as gw:
            yield f"http://127.0.0.1:{gw.gateway_port}"
    finally:
        proc.kill()
        proc.wait()


SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


def test_a_request_needing_what_no_decoder_declares_is_503_naming_it(withholding):
    r = httpx.post(withholding + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "json please"}], "max_tokens": 5, "response_format": SCHEMA})
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert "constraints (for response_format)" in msg, msg
    r = httpx.post(withholding + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert httpx.get(withholding + "/health").status_code == 200


@pytest.fixture(scope="module")
def other_template(tmp_path_factory):
    """A decoder whose checkpoint carries another chat template (the real E-series one)."""
    if not bench.FIXTURES.is_dir():
        pytest.skip(f"{bench.FIXTURES} (the real templates) is absent")
    with start_decoder(bench.real_template_checkpoint(tmp_path_factory.mktemp("other"))) as d:
        yield d


def test_a_decoder_with_another_template_is_never_routed_to(services_e2b, other_template):
    good, bad = services_e2b.decoder_addr, other_template.decoder_addr
    with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, f"{bad},{good}") as gw:
        url = f"http://127.0.0.1:{gw.gateway_port}"
        for i in range(8):
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
        calls = bench.decoder_calls(url)
        assert calls.get(bad, 0) == 0 and calls.get(good, 0) >= 8, calls
        h = httpx.get(url + "/health")
        assert h.status_code == 200 and h.json()["decoders"][bad].startswith("refused: its chat template differs")
    with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, bad) as gw:
        url = f"http://127.0.0.1:{gw.gateway_port}"
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.json()["decoder"] == "REFUSED", h.text
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
        assert r.status_code == 503 and "reads prompts" in r.json()["error"]["message"], r.text


def test_a_decoder_with_another_tokenizer_is_never_routed_to(services_e2b, tmp_path):
    """The same checkpoint with two ordinary tokens' ids swapped in ``tokenizer.json``: it loads and
    serves, but the gateway's ids would be other text to it — refused, every request to the other."""
    other = tmp_path / "swapped"
    shutil.copytree(services_e2b.checkpoint, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted((t for t in vocab if not t.startswith("<")), key=vocab.get)[-2:]  # two ordinary tokens
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with start_decoder(other) as swapped, start_gateway(
            services_e2b.checkpoint, services_e2b.encoder_addr, f"{swapped.decoder_addr},{services_e2b.decoder_addr}") as gw:
        url = f"http://127.0.0.1:{gw.gateway_port}"
        for i in range(6):
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"hello world {i}"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert bench.decoder_calls(url).get(swapped.decoder_addr, 0) == 0
        assert httpx.get(url + "/health").json()["decoders"][swapped.decoder_addr].startswith(
            "refused: its tokenizer differs")


def test_the_model_id_is_the_same_before_and_after_the_first_request(services_e2b):
    with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, services_e2b.decoder_addr) as gw:
        url = f"http://127.0.0.1:{gw.gateway_port}"
        before = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        assert httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == before


def _encoder_calls(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mmserve_gateway_upstream_calls_total{") and 'service="encoder"' in line)


def test_a_prompt_that_cannot_fit_is_refused_before_its_media_are_encoded(services_e2b):
    url = services_e2b.base_url.rsplit("/v1", 1)[0]
    img = base64.b64encode(shape_png("red", "circle", (64, 64))).decode()
    before = _encoder_calls(url)
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"max_tokens": 200, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "word " * 3990},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert _encoder_calls(url) == before

"""Gateway guards and the endpoints around chat: API key, body and media limits, models, health, metrics, OpenAPI.

A second gateway process with tight limits and an API key, in front of the
same encoder and decoder as the other e2e tests.
"""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from deploy.demo.media import shape_png, tone_wav
from deploy.processes import start_gateway

KEY = "test-key-123"


@pytest.fixture(scope="module")
def guarded(services_e2b):
    with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, services_e2b.decoder_addr,
                       ["--api-key", KEY, "--max-body-bytes", "200000", "--max-media-items", "2",
                        "--max-audio-seconds", "3", "--model-id", "gemma-test"]) as g:
        yield f"http://127.0.0.1:{g.gateway_port}"


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _audio(seconds):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(tone_wav(seconds, 8000)).decode(),
                                                   "format": "wav"}}


def test_api_key_required_and_checked(guarded):
    with pytest.raises(openai.AuthenticationError) as ei:
        _client(guarded, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["code"] == "invalid_api_key"
    r = _client(guarded).chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(guarded + "/health").status_code == 200  # probes need no key


def test_body_over_the_limit_is_413(guarded):
    big = "x" * 300_000
    r = httpx.post(guarded + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": big}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"}]}'

    r = httpx.post(guarded + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, content=chunks())
    assert r.status_code == 413


def test_media_count_and_total_audio_limits(guarded):
    c = _client(guarded)
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                     + base64.b64encode(shape_png(size=(32, 32))).decode(),
                                              "detail": "low"}}
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": [img, img, img]}])
    assert "3 media parts" in ei.value.body["message"] and ei.value.body["code"] == "too_many_media_items"
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": [_audio(2.0), _audio(1.5)]}])
    assert "3.50 s" in ei.value.body["message"] and "3 s" in ei.value.body["message"]
    r = c.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": [img, _audio(1.0)]}])
    assert r.usage.prompt_tokens_details.soft_tokens > 25


def test_models_and_model_by_id(guarded):
    c = _client(guarded)
    assert [m.id for m in c.models.list().data] == ["gemma-test"]
    assert c.models.retrieve("gemma-test").id == "gemma-test"
    with pytest.raises(openai.NotFoundError) as ei:
        c.models.retrieve("gpt-4")
    assert ei.value.body["code"] == "model_not_found"


def test_health_reports_both_upstreams_and_metrics_count(guarded):
    h = httpx.get(guarded + "/health").json()
    assert h == {"status": "ok", "encoder": "SERVING", "decoder": "SERVING"}
    _client(guarded).chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    text = httpx.get(guarded + "/metrics").text
    assert 'mmserve_gateway_chat_requests_total{status="200"}' in text
    assert "mmserve_gateway_time_to_first_token_seconds_bucket" in text


def test_openapi_document_describes_the_chat_body(guarded):
    doc = httpx.get(guarded + "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["messages"] and "stream" in schema["properties"]
    assert {"/v1/models", "/v1/models/{model_id}", "/health"} <= set(doc["paths"])


def test_image_url_fetch_when_enabled(services_e2b):
    """Fetching is off by default (400); on, with an allowlist, an allowed loopback host works."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = shape_png("green", "square", (48, 48))

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://localhost:{server.server_address[1]}/g.png"
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]
    try:
        with pytest.raises(openai.BadRequestError, match="disabled"):
            openai.OpenAI(base_url=services_e2b.base_url, api_key="x").chat.completions.create(model="m", messages=msg)
        with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, services_e2b.decoder_addr,
                           ["--url-fetch", "--url-allowlist", "localhost", "--url-fetch-allow-private"]) as g:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{g.gateway_port}/v1", api_key="x", max_retries=0)
            r = c.chat.completions.create(model="m", max_tokens=1, messages=msg)
            assert r.usage.prompt_tokens_details.soft_tokens > 0
            other = [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": f"http://127.0.0.2:{server.server_address[1]}/g.png"}}]}]
            with pytest.raises(openai.BadRequestError) as ei:
                c.chat.completions.create(model="m", messages=other)
            assert "allowlist" in ei.value.body["message"]
            assert ei.value.body["param"] == "messages[0].content[0].image_url.url"
    finally:
        server.shutdown()

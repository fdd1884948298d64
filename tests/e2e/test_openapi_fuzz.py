"""Property-based run (schemathesis + Hypothesis) over the gateway's OpenAPI document: no 5xx, ever.

The gateway under test fronts a decoder with a 96-token context, so any
generated request that passes validation decodes quickly, and bodies that
do not are 4xx with OpenAI error JSON.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from deploy.processes import start_decoder, start_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fuzz_gateway(services_e2b):
    ckpt = services_e2b.checkpoint
    with start_decoder(ckpt, ["--context-length", "96"]) as dec, \
            start_gateway(ckpt, services_e2b.encoder_addr, dec.decoder_addr) as gw:
        yield f"http://127.0.0.1:{gw.gateway_port}"


def test_no_server_errors(fuzz_gateway):
    """Every operation in the document, ~60 generated requests each (positive and negative
    cases): never a 5xx, and every 4xx is its API's error JSON (OpenAI's; Anthropic's under
    /v1/messages)."""
    schema = schemathesis.openapi.from_url(fuzz_gateway + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "GET /v1/models", "GET /v1/models/{model_id}", "GET /health"}
    seen: dict[str, set[int]] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_gateway, timeout=60)
            seen.setdefault(case.operation.path, set()).add(response.status_code // 100)
            assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
            if response.status_code >= 400 and case.operation.path.startswith("/v1/messages"):
                body = response.json()  # Anthropic's error shape
                assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
            elif response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]

        check()
    assert seen["/v1/chat/completions"] == {2, 4}  # generated bodies reached the model, and were refused

"""Every reply kind the OpenAI fronts produce validates against OpenAI's own OpenAPI document.

Each case makes real requests to the services (tiny E2B checkpoint) and validates what comes back —
JSON bodies, every SSE chunk / event, error bodies — against the component schema OpenAI publishes
for it (``tests/openai_spec.py``: ``$ref``s resolved, ``nullable`` as "or null").  A violation fails
with the schema, the reply kind and the path inside the reply.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.openai_spec import SPEC, OpenAISpec, sse_payloads

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not SPEC.exists(), reason=f"{SPEC} is not beside the project")]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]
RTOOLS = [{"type": "function", "name": "get_weather", "description": "The weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]},
    "strict": True}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
          "additionalProperties": False}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def spec() -> OpenAISpec:
    return OpenAISpec()


class Checker:
    """Collects violations per reply kind; the test fails once, listing them all."""

    def __init__(self, spec: OpenAISpec) -> None:
        self.spec = spec
        self.seen: dict[str, int] = {}
        self.bad: list[str] = []

    def check(self, kind: str, schema: str, value) -> None:
        self.seen[kind] = self.seen.get(kind, 0) + 1
        for e in self.spec.errors(schema, value):
            line = f"{kind} ({schema}) {e}"
            if line not in self.bad:
                self.bad.append(line)

    def json(self, kind: str, schema: str, r: httpx.Response, status: int = 200) -> dict:
        assert r.status_code == status, (kind, r.status_code, r.text[:500])
        body = r.json()
        self.check(kind, "ErrorResponse" if status >= 400 else schema, body)
        return body

    def sse(self, kind: str, schema: str, r: httpx.Response) -> list:
        assert r.status_code == 200, (kind, r.status_code, r.text[:500])
        out = []
        for event, data in sse_payloads(r.text):
            if data == "[DONE]":
                continue
            member = self.spec.member(schema, data.get("type", ""))
            if schema.endswith("Event") and member is None:
                self.bad.append(f"{kind}: event type {data['type']!r} is not one of {schema}'s")
            self.check(f"{kind}:{event or data.get('object') or data.get('type')}", member or schema, data)
            out.append(data)
        return out

    def done(self) -> None:
        assert not self.bad, f"{len(self.bad)} violations of OpenAI's schemas:\n" + "\n".join(self.bad[:60])


def _root(svc) -> str:
    return svc.base_url.removesuffix("/v1")


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def test_chat_completions_conform(services_e2b, spec):
    ck = Checker(spec)
    with httpx.Client(base_url=_root(services_e2b), timeout=120) as c:
        def post(**body):
            return c.post("/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 6, **body})

        ck.json("chat", "CreateChatCompletionResponse", post(temperature=0))
        ck.json("chat+logprobs", "CreateChatCompletionResponse", post(logprobs=True, top_logprobs=2))
        ck.json("chat+json_schema", "CreateChatCompletionResponse", post(max_tokens=30, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}))
        ck.json("chat+tools", "CreateChatCompletionResponse", post(max_tokens=40, tools=TOOLS,
                                                                   tool_choice="required"))
        ck.json("chat+options", "CreateChatCompletionResponse", post(
            service_tier="flex", reasoning_effort="low", prompt_cache_key="k1", metadata={"a": "b"},
            store=False, safety_identifier="u1", user="u1"))
        ck.sse("chat-stream", "CreateChatCompletionStreamResponse", post(stream=True,
                                                                         stream_options={"include_usage": True}))
        ck.sse("chat-stream+logprobs", "CreateChatCompletionStreamResponse", post(stream=True, logprobs=True,
                                                                                  top_logprobs=1))
        ck.sse("chat-stream+tools", "CreateChatCompletionStreamResponse", post(
            stream=True, max_tokens=40, tools=TOOLS, tool_choice="required"))
        # stored completions: create, list, get, messages, update, delete
        stored = ck.json("chat+store", "CreateChatCompletionResponse", post(store=True, metadata={"topic": "t"}))
        ck.sse("chat-stream+store", "CreateChatCompletionStreamResponse", post(store=True, stream=True))
        ck.json("chat.list", "ChatCompletionList", c.get("/v1/chat/completions", params={"metadata[topic]": "t"}))
        ck.json("chat.get", "CreateChatCompletionResponse", c.get(f"/v1/chat/completions/{stored['id']}"))
        msgs = c.get(f"/v1/chat/completions/{stored['id']}/messages")
        # OpenAI's schema lists the stored messages as response messages (role "assistant" only, refusal
        # required) while its own example lists the request's user turns: checked beside the role
        body = msgs.json()
        for m in body["data"]:
            m = {**m, "role": "assistant"}
            ck.check("chat.messages[]", "ChatCompletionResponseMessage", m)
        ck.check("chat.messages", "ChatCompletionMessageList", {**body, "data": []})
        ck.json("chat.update", "CreateChatCompletionResponse", c.post(f"/v1/chat/completions/{stored['id']}",
                                                                      json={"metadata": {"topic": "u"}}))
        ck.json("chat.delete", "ChatCompletionDeleted", c.delete(f"/v1/chat/completions/{stored['id']}"))
        # errors
        ck.json("chat.error400", "", post(temperature=9), status=400)
        ck.json("chat.error404", "", c.get("/v1/chat/completions/chatcmpl-nope"), status=404)
        ck.json("models", "ListModelsResponse", c.get("/v1/models"))
    ck.done()


def test_responses_conform(services_e2b, spec):
    ck = Checker(spec)
    with httpx.Client(base_url=_root(services_e2b), timeout=120) as c:
        def post(**body):
            return c.post("/v1/responses", json={"model": "m", "input": "hi", "max_output_tokens": 6, **body})

        r = ck.json("response", "Response", post(metadata={"k": "v"}, service_tier="priority",
                                                 prompt_cache_key="k", truncation="auto", temperature=0))
        ck.json("response+json", "Response", post(max_output_tokens=30, text={"format": {
            "type": "json_schema", "name": "s", "schema": SCHEMA, "strict": True}}))
        call = ck.json("response+tool", "Response", post(max_output_tokens=60, tools=RTOOLS, tool_choice="required",
                                                         parallel_tool_calls=False))
        assert call["status"] == "completed", call  # one bounded call fits: continued below
        ck.json("response+reasoning", "Response", post(reasoning={"effort": "low"}, user="u"))
        fc = next(i for i in call["output"] if i["type"] == "function_call")
        after = ck.json("response+tool_result", "Response", post(previous_response_id=call["id"], input=[
            {"type": "function_call_output", "call_id": fc["call_id"], "output": "sunny"}], tools=[
            {k: v for k, v in RTOOLS[0].items() if k != "strict"}]))  # strict omitted: echoed as applied
        assert after["tools"][0]["strict"] is True
        ck.json("response.input_items+output", "ResponseItemList", c.get(f"/v1/responses/{after['id']}/input_items"))
        for kind, body in (("stream", {}), ("stream+tool", {"tools": RTOOLS, "tool_choice": "required",
                                                              "max_output_tokens": 40}),
                           ("stream+reasoning", {"reasoning": {"effort": "medium"}})):
            ck.sse(f"response-{kind}", "ResponseStreamEvent", post(stream=True, **body))
        ck.json("response.get", "Response", c.get(f"/v1/responses/{r['id']}"))
        ck.json("response.input_items", "ResponseItemList", c.get(f"/v1/responses/{call['id']}/input_items"))
        deleted = c.delete(f"/v1/responses/{r['id']}")
        assert deleted.status_code == 200 and deleted.json() == {"id": r["id"], "object": "response",
                                                                 "deleted": True}
        ck.json("response.error400", "", post(temperature=9), status=400)
        ck.json("response.error404", "", c.get(f"/v1/responses/{r['id']}"), status=404)
    ck.done()


def test_transcriptions_conform(services_e2b, spec):
    ck = Checker(spec)
    wav = _wav()
    with httpx.Client(base_url=_root(services_e2b), timeout=120) as c:
        def post(**data):
            return c.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")},
                          data={"model": "m", **data})

        ck.json("transcription", "CreateTranscriptionResponseJson", post())
        body = ck.json("transcription+logprobs", "CreateTranscriptionResponseJson",
                       post(**{"include[]": "logprobs", "chunking_strategy": "auto"}))
        assert isinstance(body.get("logprobs"), list)
        text = post(response_format="text")
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
        events = ck.sse("transcription-stream", "CreateTranscriptionResponseStreamEvent", post(stream="true"))
        assert events[-1]["type"] == "transcript.text.done"
        assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
        ck.json("transcription.error400", "", post(response_format="srt"), status=400)
    ck.done()


def test_error_bodies_conform_on_every_openai_path(services_e2b, spec):
    ck = Checker(spec)
    with httpx.Client(base_url=_root(services_e2b), timeout=60) as c:
        ck.json("bad-json", "", c.post("/v1/chat/completions", content=b"{", headers={
            "content-type": "application/json"}), status=400)
        ck.json("unknown-model", "", c.post("/v1/chat/completions", json={"model": "nope", "messages": USER}),
                status=404)
        ck.json("bad-image", "", c.post("/v1/chat/completions", json={"model": "m", "messages": [{
            "role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]}), status=400)
        ck.json("unknown-route", "", c.get("/v1/nothing-here"), status=404)
        ck.json("bad-multipart", "", c.post("/v1/audio/transcriptions", content=b"x"), status=400)
        ck.json("bad-responses", "", c.post("/v1/responses", json={"model": "m", "input": []}), status=400)
    ck.done()


def test_the_spec_checker_catches_a_bad_reply(spec):
    """The checker is not vacuous: the replies' known earlier faults are caught."""
    msg = {"role": "assistant", "content": "x"}  # no refusal (required, nullable)
    assert any("refusal" in e for e in spec.errors("ChatCompletionResponseMessage", msg))
    assert spec.errors("ChatCompletionResponseMessage", {**msg, "refusal": None}) == []
    usage = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2}
    assert spec.errors("ResponseUsage", usage), "cache_write_tokens is required by the document"
    assert json.dumps(spec.components["schemas"]["ErrorResponse"])  # loaded and resolvable

"""The OpenAI Responses front: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``,
``GET /v1/responses/{id}/input_items``.

Why: agent frameworks speak the Responses API — items in, items out, conversations continued by
``previous_response_id``.  A thin front over the one pipeline: ``responses_schema`` parses,
the stored conversation of the previous response (``responses_store``) is put before the new
input, ``Pipeline.start`` runs it, and the typed events become output items — ``reasoning``
(the thought channel, when ``reasoning.effort`` turned it on), ``message`` (``output_text``),
``function_call`` — or the semantic event stream (``response.created``, ``…output_item.added``,
``…output_text.delta``, ``…function_call_arguments.delta``, ``…reasoning_text.delta``,
``…done`` events, ``response.completed`` / ``response.incomplete``), each with its
``sequence_number``.  A continuation renders the whole conversation again, and the decoder
that served its first turn (``--decoder-affinity conversation``) finds its KV in the prefix
cache, so turn 2 reports ``cached_tokens``.  Event loop.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.bodies import credential, read_json
from gateway.config import GatewayConfig
from gateway.errors import HTTPError, error_response
from gateway.events import Delta, delta_pieces
from gateway.fronts.openai_responses.parse import ResponsesRequest, conversation, parse_responses_request
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Generation, Pipeline
from gateway.reply import Folded, Started, begin, fold, no_done, sse
from gateway.request import Message, Part
from gateway.store import ResponseStore, StoredResponse, namespace
from mmserve_core.runtime.logs import get_logger

log = get_logger(__name__)
ITEM_OF = {"reasoning": "reasoning", "text": "message", "tool": "function_call"}  # a delta piece -> its item


def _hex() -> str:
    return uuid.uuid4().hex[:24]


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _continuable(prior: list[Message], previous_id: str) -> list[Message]:
    """A stored conversation whose last call was cut off (its arguments are not a JSON object) cannot
    be continued: the call the client answers does not exist in full."""
    for m in prior:
        for c in m.tool_calls:
            if not _is_object(c.arguments or "{}"):
                raise HTTPError(400, f"previous response {previous_id!r} ends in function call {c.id!r} whose "
                                "arguments were cut off (max_output_tokens), so it cannot be continued; start from "
                                "its input with a larger max_output_tokens", type_="invalid_request_error",
                                param="previous_response_id", code="invalid_value")
    return prior


class Output:
    """The output items of one response as they are built (the same for streamed and not)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.kind: str | None = None  # the open item's type

    @property
    def open(self) -> dict | None:
        return self.items[-1] if self.kind is not None else None

    def start(self, kind: str, call=None) -> dict:
        if kind == "reasoning":
            item = {"id": f"rs_{_hex()}", "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        elif kind == "message":
            item = {"id": f"msg_{_hex()}", "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
        else:
            item = {"id": f"fc_{_hex()}", "type": "function_call", "call_id": call.id, "name": call.name,
                    "arguments": "", "status": "in_progress"}
        self.items.append(item)
        self.kind = kind
        return item

    def finish(self) -> dict | None:
        """Close the open item; returns it complete."""
        item = self.open
        if item is None:
            return None
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": item.pop("_text", "")}]
        elif item["type"] == "message":
            item["content"] = [{"type": "output_text", "text": item.pop("_text", ""), "annotations": [],
                                "logprobs": []}]
        item["status"] = "completed" if item["type"] != "function_call" or _is_object(item["arguments"]) \
            else "incomplete"  # a call cut off by max_output_tokens
        self.kind = None
        return item



def assistant_message(got: Folded) -> Message:
    """The turn as a continuation (``previous_response_id``) replays it."""
    text = got.text
    return Message("assistant", [Part("text", "output", text=text)] if text else [], "output",
                   tool_calls=list(got.done.tool_calls) if got.done else [], reasoning=got.thought)


def response_body(rid: str, rr: ResponsesRequest, model: str, created: int, output: Output | None,
                  got: Folded | None, *, store: bool) -> dict:
    done = got.done if got is not None else None
    status = "in_progress" if done is None else "incomplete" if done.finish_reason == "length" else "completed"
    c = done.completion if done is not None else None
    echo = rr.echo
    body = {
        "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": rr.instructions, "max_output_tokens": echo.get("max_output_tokens"), "model": model,
        "output": [] if output is None or done is None else output.items,
        "parallel_tool_calls": rr.chat.parallel_tool_calls, "previous_response_id": rr.previous_response_id,
        "reasoning": echo.get("reasoning") or {"effort": None, "summary": None}, "store": store,
        "temperature": echo.get("temperature"), "text": echo.get("text") or {"format": {"type": "text"}},
        "tool_choice": echo.get("tool_choice") or ("auto" if rr.chat.tools else "none"),
        "tools": echo.get("tools") or [], "top_p": echo.get("top_p"), "truncation": rr.chat.truncation,
        "metadata": rr.metadata, "service_tier": rr.chat.service_tier,
        "prompt_cache_key": rr.chat.cache_key,
    }
    # omitted rather than null where OpenAI's schema has no null: the user string, usage before the end
    for k in ("user", "safety_identifier"):
        if echo.get(k) is not None:
            body[k] = echo[k]
    if c is not None:
        body["usage"] = {
            "input_tokens": c.prompt_tokens,
            "input_tokens_details": {"cached_tokens": c.cached_tokens, "cache_write_tokens": c.cache_write_tokens},
            "output_tokens": c.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": got.reasoning_tokens if got else 0},
            "total_tokens": c.prompt_tokens + c.completion_tokens}
    return body


class _Events:
    """Builds the output items and, when ``stream``, the semantic event stream beside them (one
    code path for both, so a streamed response is the non-streamed one, event by event)."""

    def __init__(self, out: Output, stream: bool = True) -> None:
        self.out = out
        self.stream = stream
        self.seq = 0

    def ev(self, kind: str, body: dict) -> str:
        if not self.stream:  # building the items only: no event text to make
            return ""
        payload = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def close(self) -> list[str]:
        out, item = self.out, self.out.open
        if item is None:
            return []
        i = len(out.items) - 1
        events = []
        if item["type"] == "reasoning":
            events.append(self.ev("response.reasoning_text.done", {"item_id": item["id"], "output_index": i,
                                                                   "content_index": 0, "text": item.get("_text", "")}))
        elif item["type"] == "message":
            text = item.get("_text", "")
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            events.append(self.ev("response.output_text.done", {"item_id": item["id"], "output_index": i,
                                                                "content_index": 0, "text": text, "logprobs": []}))
            events.append(self.ev("response.content_part.done", {"item_id": item["id"], "output_index": i,
                                                                 "content_index": 0, "part": part}))
        else:
            events.append(self.ev("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": i, "name": item["name"], "arguments": item["arguments"]}))
        done = out.finish()
        events.append(self.ev("response.output_item.done", {"output_index": i, "item": done}))
        return events

    def feed(self, ev: Delta, keep_thought: bool) -> list[str]:
        out, events = self.out, []
        for piece, value in delta_pieces(ev, keep_thought):
            kind = ITEM_OF[piece]
            if kind != out.kind or (kind == "function_call" and value.id is not None):
                events += self.close()
                item = out.start(kind, value if kind == "function_call" else None)
                i = len(out.items) - 1
                added = {k: v for k, v in item.items() if not k.startswith("_")}
                events.append(self.ev("response.output_item.added", {"output_index": i, "item": added}))
                if kind == "message":
                    events.append(self.ev("response.content_part.added", {
                        "item_id": item["id"], "output_index": i, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}))
            item, i = out.open, len(out.items) - 1
            if kind == "reasoning":
                item["_text"] = item.get("_text", "") + value
                events.append(self.ev("response.reasoning_text.delta", {"item_id": item["id"], "output_index": i,
                                                                        "content_index": 0, "delta": value}))
            elif kind == "message":
                item["_text"] = item.get("_text", "") + value
                events.append(self.ev("response.output_text.delta", {"item_id": item["id"], "output_index": i,
                                                                     "content_index": 0, "delta": value,
                                                                     "logprobs": []}))
            elif value.arguments:
                item["arguments"] += value.arguments
                events.append(self.ev("response.function_call_arguments.delta", {
                    "item_id": item["id"], "output_index": i, "delta": value.arguments}))
        return events


@dataclass
class _Turn:
    """One response being made: its id and time, the parsed request, and the conversation it continues."""

    rid: str
    rr: ResponsesRequest
    model: str
    created: int
    ns: str  # the store namespace (the presented credential's)
    inputs: list[Message]
    prior: list[Message]

    @property
    def keep_thought(self) -> bool:
        return bool(self.rr.chat.include_reasoning)


class ResponsesFront:
    def __init__(self, pipeline: Pipeline, metrics: GatewayMetrics, cfg: GatewayConfig) -> None:
        self.pipeline, self.metrics, self.cfg = pipeline, metrics, cfg
        self.store = ResponseStore(cfg.responses_store_bytes)

    def _keep(self, turn: _Turn, got: Folded, body: dict) -> bool:
        rr = turn.rr
        if not rr.store:
            return False
        items = []
        for item in rr.input_items:
            item = dict(item)
            item.setdefault("id", f"msg_{_hex()}" if item.get("type", "message") == "message" else f"it_{_hex()}")
            if item.get("type", "message") == "message" and isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            item.setdefault("type", "message")
            if item["type"] in ("function_call", "function_call_output", "message"):
                item.setdefault("status", "completed")
            items.append(item)
        conv = [*turn.prior, *turn.inputs, assistant_message(got)]
        return self.store.put(turn.ns, turn.rid, StoredResponse(body, items, conv))

    def _finish(self, turn: _Turn, out: Output, got: Folded) -> dict:
        """The completed response object, stored when asked (``store`` says whether it was kept)."""
        body = response_body(turn.rid, turn.rr, turn.model, turn.created, out, got, store=turn.rr.store)
        body["store"] = self._keep(turn, got, body)
        c = got.done.completion
        log.info("completed", front="responses", status=body["status"], prompt_tokens=c.prompt_tokens,
                 completion_tokens=c.completion_tokens)
        return body

    async def create(self, request: Request):
        async def parse():
            rr = parse_responses_request(await read_json(request), allow_urls=self.cfg.url_fetch)
            ns = namespace(credential(request))
            prior: list[Message] = []
            if rr.previous_response_id is not None:
                entry = self.store.get(ns, rr.previous_response_id)
                if entry is None:
                    raise HTTPError(404, f"previous response {rr.previous_response_id!r} is not stored here (never "
                                    "stored, deleted, or evicted)", type_="invalid_request_error",
                                    param="previous_response_id", code="not_found")
                prior = _continuable(entry.conversation, rr.previous_response_id)
            inputs = rr.chat.messages
            rr.chat.messages = conversation(prior, rr)
            turn = _Turn(f"resp_{_hex()}", rr, self.pipeline.model_id, int(time.time()), ns, inputs, prior)
            return turn, rr.chat

        started = await begin(request, self.pipeline, self.metrics, "responses request", parse)
        if not isinstance(started, Started):
            return started
        turn, gen = started.parsed, started.gen
        if turn.rr.chat.stream:
            return sse(self._stream(gen, turn), started.rid, gen)
        try:
            got = await fold(gen, request.is_disconnected)
        except HTTPError as e:
            return error_response(e, request.url.path)
        out = Output()
        events = _Events(out, stream=False)
        for d in got.deltas:
            events.feed(d, turn.keep_thought)
        events.close()
        return JSONResponse(self._finish(turn, out, got))

    async def _stream(self, gen: Generation, turn: _Turn):
        out, got = Output(), Folded()
        events = _Events(out)
        start = response_body(turn.rid, turn.rr, turn.model, turn.created, None, None, store=turn.rr.store)
        yield events.ev("response.created", {"response": start})
        yield events.ev("response.in_progress", {"response": start})
        try:
            async for ev in gen.events():
                got.add(ev)
                if isinstance(ev, Delta):
                    for e in events.feed(ev, turn.keep_thought):
                        yield e
                    continue
                for e in events.close():
                    yield e
                body = self._finish(turn, out, got)
                kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
                yield events.ev(kind, {"response": body})
            if got.done is None:
                raise no_done()
        except HTTPError as err:
            log.error("stream failed", status=err.status, error=err.message)
            yield events.ev("error", {"code": err.code, "message": err.message, "param": err.param})


def add_responses_routes(app: FastAPI, pipeline: Pipeline, metrics: GatewayMetrics, cfg: GatewayConfig) -> None:
    front = ResponsesFront(pipeline, metrics, cfg)
    app.state.responses = front

    def _missing(response_id: str) -> JSONResponse:
        return error_response(HTTPError(404, f"no stored response {response_id!r}", type_="invalid_request_error",
                                        param="response_id", code="not_found"), "/v1/responses")

    @app.post("/v1/responses")
    async def create(request: Request):
        return await front.create(request)

    @app.get("/v1/responses/{response_id}")
    async def get(response_id: str, request: Request):
        entry = front.store.get(namespace(credential(request)), response_id)
        return JSONResponse(entry.body) if entry is not None else _missing(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request):
        if not front.store.delete(namespace(credential(request)), response_id):
            return _missing(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, request: Request):
        entry = front.store.get(namespace(credential(request)), response_id)
        if entry is None:
            return _missing(response_id)
        data = entry.input_items
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": False})

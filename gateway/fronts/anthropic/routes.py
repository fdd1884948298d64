"""The Anthropic Messages front: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Why: agent tools and coding assistants speak Anthropic's API.  A thin front like the OpenAI
one: ``anthropic_schema`` parses the body into the typed ``ChatRequest``, ``Pipeline.start``
runs it (same limits, auth, request ids, metrics, constraints), and the typed events become
Anthropic's message — content blocks ``thinking`` (the thought channel, when asked for),
``text`` and ``tool_use``; ``stop_reason`` ``end_turn`` / ``max_tokens`` / ``stop_sequence`` /
``tool_use`` — or its event stream (``message_start``, ``ping``, ``content_block_start`` /
``_delta`` (``thinking_delta``, ``text_delta``, ``input_json_delta``) / ``_stop``,
``message_delta`` with the stop reason and usage, ``message_stop``).  ``count_tokens`` renders
and encodes the request exactly as a generation would and counts the prompt ids.
Errors come out in Anthropic's shape (``errors.error_body`` by path).  Event loop.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.bodies import read_json
from gateway.config import GatewayConfig
from gateway.errors import HTTPError, anthropic_body, error_response, failure_response
from gateway.events import Done, delta_pieces
from gateway.fronts.anthropic.parse import parse_messages_request
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Generation, Pipeline
from gateway.reply import Folded, Started, begin, fold, no_done, sse
from mmserve_core.runtime.logs import get_logger, new_request_id, request_id_var

log = get_logger(__name__)
PING_EVERY_S = 10.0
BLOCK_OF = {"reasoning": "thinking", "text": "text", "tool": "tool_use"}  # a delta piece -> its content block


def stop_reason(done: Done) -> tuple[str, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)`` for the response's finish."""
    if done.finish_reason == "tool_calls":
        return "tool_use", None
    if done.finish_reason == "length":
        return "max_tokens", None
    if done.completion.stop_string is not None:
        return "stop_sequence", done.completion.stop_string
    return "end_turn", None


def usage(done: Done, tier: str = "standard") -> dict[str, Any]:
    c = done.completion
    return {"input_tokens": c.prompt_tokens - c.cached_tokens, "output_tokens": c.completion_tokens,
            "cache_read_input_tokens": c.cached_tokens, "cache_creation_input_tokens": c.cache_write_tokens, "service_tier": tier}


def _tool_input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:  # a call the model wrote badly (cut off by max_tokens): as text
        return {"_raw_arguments": arguments}


def message(got: Folded, mid: str, model: str, keep_thinking: bool) -> dict:
    """The ``message`` object of a whole generation."""
    done = got.done
    assert done is not None
    blocks: list[dict] = []
    if keep_thinking and got.thought:
        blocks.append({"type": "thinking", "thinking": got.thought, "signature": ""})
    if got.text:
        blocks.append({"type": "text", "text": got.text})
    blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": _tool_input(c.arguments)}
               for c in done.tool_calls]
    reason, seq = stop_reason(done)
    log.info("completed", front="anthropic", stop_reason=reason, prompt_tokens=done.completion.prompt_tokens,
             completion_tokens=done.completion.completion_tokens)
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": reason, "stop_sequence": seq, "usage": usage(done)}


def _event(kind: str, body: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body}, separators=(',', ':'))}\n\n"


async def stream(gen: Generation, mid: str, model: str, keep_thinking: bool, prompt_tokens: int):
    """Anthropic's event stream; a block closes when the next kind of content begins."""
    yield _event("message_start", {"message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
    yield _event("ping", {})
    index, kind = -1, None  # the open block
    last_ping = time.monotonic()

    def close():
        out = []
        if kind == "thinking":
            out.append(_event("content_block_delta", {"index": index, "delta": {"type": "signature_delta",
                                                                                 "signature": ""}}))
        if kind is not None:
            out.append(_event("content_block_stop", {"index": index}))
        return out

    try:
        async for ev in gen.events():
            if isinstance(ev, Done):
                for e in close():
                    yield e
                reason, seq = stop_reason(ev)
                yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                               "usage": {"output_tokens": ev.completion.completion_tokens}})
                yield _event("message_stop", {})
                return
            for piece, value in delta_pieces(ev, keep_thinking):
                what = BLOCK_OF[piece]
                new_call = what == "tool_use" and value.id is not None
                if what != kind or new_call:
                    for e in close():
                        yield e
                    index, kind = index + 1, what
                    block = ({"type": "thinking", "thinking": "", "signature": ""} if what == "thinking" else
                             {"type": "text", "text": ""} if what == "text" else
                             {"type": "tool_use", "id": value.id, "name": value.name, "input": {}})
                    yield _event("content_block_start", {"index": index, "content_block": block})
                if what == "thinking":
                    yield _event("content_block_delta", {"index": index, "delta": {"type": "thinking_delta",
                                                                                    "thinking": value}})
                elif what == "text":
                    yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta",
                                                                                    "text": value}})
                elif value.arguments:
                    yield _event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                                    "partial_json": value.arguments}})
            if time.monotonic() - last_ping > PING_EVERY_S:
                last_ping = time.monotonic()
                yield _event("ping", {})
        raise no_done()  # the loop returns at the Done: here the decoder's stream ended without one
    except HTTPError as err:
        log.error("stream failed", status=err.status, error=err.message)
        yield _event("error", {"error": anthropic_body(err)["error"]})


def add_messages_routes(app: FastAPI, pipeline: Pipeline, metrics: GatewayMetrics, cfg: GatewayConfig) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        async def parse():
            req = parse_messages_request(await read_json(request), allow_urls=cfg.url_fetch)
            return req, req

        started = await begin(request, pipeline, metrics, "messages request", parse)
        if not isinstance(started, Started):
            return started
        req, gen = started.parsed, started.gen
        mid, model = f"msg_{uuid.uuid4().hex[:24]}", pipeline.model_id
        keep = bool(req.include_reasoning)
        if req.stream:
            return sse(stream(gen, mid, model, keep, len(gen.prompt_ids)), started.rid, gen)
        try:
            return JSONResponse(message(await fold(gen, request.is_disconnected), mid, model, keep))
        except HTTPError as e:
            return error_response(e, request.url.path)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        """The prompt's length as a generation would see it: template, tools, media soft tokens."""
        rid = request_id_var.get() or new_request_id()
        try:
            req = parse_messages_request(await read_json(request), allow_urls=cfg.url_fetch, counting=True)
            ids, *_ = await pipeline.prepare(req, rid)
        except Exception as e:  # noqa: BLE001 - every failure becomes Anthropic error JSON
            return failure_response(e, request.url.path, "count_tokens")
        return JSONResponse({"input_tokens": len(ids)})

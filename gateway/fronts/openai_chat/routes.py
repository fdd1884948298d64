"""The OpenAI front: ``POST /v1/chat/completions`` over the typed pipeline.

Why: a front is one module and its routes — parse the body into the typed
``ChatRequest`` (``openai_schema``), ``Pipeline.start`` it, format the
typed events (``responses``).  For ``stream: true`` the first event is
awaited *before* the SSE response starts, so an invalid request still gets
a proper 4xx, not an error buried in a 200 stream.  The OpenAPI body schema
is built from the same field table the validator reads.  Event loop.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.bodies import read_json
from gateway.config import GatewayConfig
from gateway.errors import HTTPError, error_response
from gateway.fronts.openai_chat.format import ChatReply, chunks, completion_body
from gateway.fronts.openai_chat.parse import parse_chat_request
from gateway.fronts.openai_chat.store import ChatStore, add_chat_store_routes
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.reply import Started, begin, fold, sse
from gateway.request import ROLES
from gateway.request_options import openapi_properties as options_openapi
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire.fields import openapi_properties

log = get_logger(__name__)


def add_chat_routes(app: FastAPI, pipeline: Pipeline, metrics: GatewayMetrics, cfg: GatewayConfig) -> None:
    chats = ChatStore(cfg.chat_store_bytes)
    app.state.chat_store = chats

    @app.post("/v1/chat/completions", openapi_extra=chat_openapi(pipeline.served_models))
    async def chat_completions(request: Request):
        async def parse():
            body = await read_json(request)
            req = parse_chat_request(body, allow_urls=cfg.url_fetch)
            if isinstance(body.get("safety_identifier"), str):
                log.info("end user", safety_identifier=body["safety_identifier"])
            return (body, req), req

        started = await begin(request, pipeline, metrics, "chat completion", parse)
        if not isinstance(started, Started):
            return started
        (body, req), gen = started.parsed, started.gen
        reply = ChatReply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), pipeline.model_id, req.service_tier,
                          req.return_token_ids, pipeline.logprobs if req.sampling.logprobs else None,
                          pipeline.keep_reasoning(req))
        keep = (lambda done: chats.keep(request, done, body["messages"], req.metadata)) if req.store else None
        if req.stream:
            return sse(chunks(gen, reply, req.include_usage, on_complete=keep), started.rid, gen)
        try:
            whole = completion_body(reply, await fold(gen, request.is_disconnected))
        except HTTPError as e:
            return error_response(e, request.url.path)
        log.info("completed", finish_reason=whole["choices"][0]["finish_reason"], **whole["usage"])
        if keep is not None:
            keep(whole)
        return JSONResponse(whole)

    add_chat_store_routes(app, chats)


_CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
_TOOL_CALL = {"type": "object", "required": ["id", "function"], "properties": {
    "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
_MESSAGES = {"type": "array", "minItems": 1, "items": {"oneOf": [
    {"type": "object", "required": ["role", "content"], "additionalProperties": False,
     "properties": {"role": {"type": "string", "enum": [r for r in ROLES if r not in ("assistant", "tool")]},
                    "content": _CONTENT}},
    {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
        "role": {"type": "string", "enum": ["assistant"]},
        "content": {"oneOf": [*_CONTENT["oneOf"], {"type": "null"}]},
        "tool_calls": {"type": "array", "description": "the calls this turn made", "items": _TOOL_CALL}}},
    {"type": "object", "required": ["role", "tool_call_id", "content"], "additionalProperties": False,
     "properties": {"role": {"type": "string", "enum": ["tool"]},
                    "tool_call_id": {"type": "string", "description": "the call this is the result of"},
                    "content": _CONTENT}},
]}}
_TOOLS = {
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"],
                                         "additionalProperties": False, "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                    "description": {"type": "string"}, "parameters": {"type": "object"},
                                    "strict": {"type": "boolean"}}}}}},
    "tool_choice": {"oneOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}],
        "description": "required / a named function: enforced by the decoder (a grammar of the call)"},
    "parallel_tool_calls": {"type": "boolean"},
    "response_format": {"type": "object", "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {
            "name": {"type": "string"}, "schema": {"type": "object"}, "strict": {"type": "boolean"}}},
    }, "description": "enforced by the decoder token by token (json_object, json_schema)"},
}
_RESPONSES = {
    "200": {"description": "A chat.completion, or an SSE stream of chat.completion.chunk when stream is true"},
    "400": {"description": "Invalid request (OpenAI error JSON naming the param)"},
    "401": {"description": "Missing or wrong API key"},
    "404": {"description": "Unknown model (model_not_found)"},
    "413": {"description": "Request body too large"},
    "429": {"description": "Overloaded; retry after Retry-After seconds"},
    "503": {"description": "An upstream service is unavailable"},
}


def chat_openapi(models: tuple[str, ...]) -> dict:
    """The request body as OpenAPI sees it (the handler parses JSON itself, to answer every
    mistake with OpenAI's error shape and a ``param``, so FastAPI cannot infer it): the served
    model names, the sampling fields from the one field table (``fields.openapi_properties``), the
    honoured options from theirs (``request_options.openapi_properties``), and no other keys (they
    are refused by name)."""
    properties = {
        "model": {"type": "string", "enum": list(models)},
        "messages": _MESSAGES,
        **openapi_properties(),
        **options_openapi(),
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "enum": [1]},
        "user": {"type": "string"},
        "chat_template_kwargs": {"type": "object", "additionalProperties": {"type": ["boolean", "number", "string"]}},
        "return_token_ids": {"type": "boolean"},
        **_TOOLS,
    }
    schema = {"type": "object", "required": ["messages"], "additionalProperties": False, "properties": properties}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": _RESPONSES}

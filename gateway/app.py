"""The OpenAI-compatible HTTP app: routes only.

Why: OpenAI clients should just work.  ``/v1/chat/completions`` parses and
validates, hands the request to the ``Pipeline`` (encode, render, expand,
decode) and formats the result (``responses``).  For ``stream: true`` the
first decoder message is awaited *before* the SSE response starts, so an
invalid request still gets a proper 4xx, not an error buried in a 200
stream.  No MLX in this process; everything runs on the ASGI event loop.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.config import GatewayConfig
from gateway.errors import HTTPError, to_http
from gateway.metrics import GatewayMetrics
from gateway.middleware import GuardMiddleware, RequestIdMiddleware
from gateway.openai_schema import INT32_MAX, SEED_MAX, SEED_MIN, ChatRequest, parse_chat_request
from gateway.pipeline import Pipeline
from gateway.responses import complete, error_response, sse
from mmserve_core.runtime.logs import REQUEST_ID_HEADER, get_logger, new_request_id, request_id_var

log = get_logger(__name__)


def create_app(cfg: GatewayConfig) -> FastAPI:
    pipeline = Pipeline(cfg)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pipeline.open(on_call=lambda svc, addr, outcome: metrics.upstream.labels(svc, addr, outcome).inc())
        chat_server = None
        if cfg.grpc_port is not None:  # the typed gRPC front shares this loop and this pipeline
            from gateway.chat_server import start_chat_server

            chat_server, port = await start_chat_server(pipeline, cfg)
            app.state.grpc_port = port
            port_file = os.environ.get("MMSERVE_GRPC_PORT_FILE")
            if port_file:
                with open(port_file, "w") as f:
                    f.write(str(port))
        yield
        if chat_server is not None:
            await chat_server.stop(cfg.drain_grace_s)
        await pipeline.close()

    app = FastAPI(title="mmserve gateway", version="0.1.0", lifespan=lifespan)
    app.state.pipeline = pipeline
    app.state.metrics = metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):
        """Routing errors (unknown path, wrong method) in OpenAI's error shape too."""
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(HTTPError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        type_=type_, code=str(exc.detail).lower().replace(" ", "_")))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "path", "query"))
        return error_response(HTTPError(400, f"{loc or 'request'}: {first.get('msg', 'invalid')}",
                                        type_="invalid_request_error", param=loc or None, code="invalid_value"))

    # outermost first: the request id is bound before the guard can answer 401/413
    app.add_middleware(GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health():
        """200 when both upstreams answer SERVING, else 503 naming which does not."""
        status = await pipeline.upstream_health()
        ok = all(v == "SERVING" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **status}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "mmserve"}

    @app.get("/v1/models")
    async def models():
        # one model, listed once by its id; its aliases are accepted wherever a model is named
        return {"object": "list", "data": [_model_card(pipeline.model_id)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        try:
            pipeline.check_model(model_id)
        except HTTPError as e:
            return error_response(e)
        return _model_card(model_id)

    @app.post("/v1/chat/completions", openapi_extra=CHAT_OPENAPI)
    async def chat_completions(request: Request):
        rid = request_id_var.get() or new_request_id()
        t0 = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"request body is not valid JSON: {e}", type_="invalid_request_error",
                                code="invalid_json") from None
            except RecursionError:
                raise HTTPError(400, "request body nests JSON too deeply", type_="invalid_request_error",
                                code="invalid_json") from None
            req = parse_chat_request(body, allow_urls=cfg.url_fetch)
            ids, spans, encode_ms = await pipeline.prepare(req, rid)
            try:
                call, first = await pipeline.start_generate(ids, spans, req.sampling, rid)
            except grpc.aio.AioRpcError as e:
                raise to_http(e, upstream="decoder") from None
            if first is grpc.aio.EOF:
                raise HTTPError(502, "decoder closed the stream without a response", type_="server_error")
        except Exception as e:  # noqa: BLE001 - every failure becomes OpenAI error JSON
            err = to_http(e)
            if err.status >= 500 and not isinstance(e, (HTTPError, grpc.aio.AioRpcError)):
                log.exception("chat completion failed")
            metrics.requests.labels(str(err.status)).inc()
            return error_response(err)
        metrics.ttft.observe(time.perf_counter() - t0)
        metrics.requests.labels("200").inc()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = pipeline.model_id
        if req.stream:
            return StreamingResponse(
                sse(call, first, completion_id, created, model, req.include_usage, encode_ms,
                    req.return_token_ids, pipeline.logprobs if req.sampling.logprobs else None,
                    _keep_reasoning(req, cfg)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", REQUEST_ID_HEADER: rid},
            )
        return await complete(call, first, completion_id, created, model, encode_ms,
                              ids if req.return_token_ids else None,
                              pipeline.logprobs if req.sampling.logprobs else None,
                              _keep_reasoning(req, cfg), request.is_disconnected)

    return app


# The request body as OpenAPI sees it (the handler parses JSON itself, to answer every
# mistake with OpenAI's error shape and a ``param``, so FastAPI cannot infer it).
CHAT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["messages"],
            "properties": {
                "model": {"type": "string"},
                "messages": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["role"],
                    "properties": {
                        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
                    },
                }},
                "max_tokens": {"type": "integer", "minimum": 1},
                "max_completion_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "top_k": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
                "min_p": {"type": "number", "minimum": 0, "maximum": 1},
                "seed": {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX},
                "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
                "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
                "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
                "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
                "logprobs": {"type": "boolean"},
                "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
                "stream": {"type": "boolean"},
                "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                "n": {"type": "integer", "enum": [1]},
                "user": {"type": "string"},
                "include_reasoning": {"type": "boolean"},
                "chat_template_kwargs": {"type": "object"},
                "return_token_ids": {"type": "boolean"},
            },
        }}},
    },
    "responses": {
        "200": {"description": "A chat.completion, or an SSE stream of chat.completion.chunk when stream is true"},
        "400": {"description": "Invalid request (OpenAI error JSON naming the param)"},
        "401": {"description": "Missing or wrong API key"},
        "413": {"description": "Request body too large"},
        "429": {"description": "Overloaded; retry after Retry-After seconds"},
        "503": {"description": "An upstream service is unavailable"},
    },
}


def _keep_reasoning(req: ChatRequest, cfg: GatewayConfig) -> bool:
    return req.include_reasoning if req.include_reasoning is not None else cfg.reasoning == "separate"



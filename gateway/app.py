"""The HTTP app: one pipeline, the fronts' routes, and what every front shares.

Why: the app is assembled from named steps — the lifespan (upstream pools
and the typed gRPC front on this loop), OpenAI-shaped errors for routing
and validation failures, the guard middleware, the service routes
(``/health``, ``/metrics``, ``/v1/models``) — and each client API adds its
own routes (``openai_chat``).  No MLX in this process; everything runs on
the ASGI event loop.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.config import GatewayConfig
from gateway.errors import HTTPError, error_response
from gateway.fronts.anthropic.routes import add_messages_routes
from gateway.fronts.openai_chat.routes import add_chat_routes
from gateway.fronts.openai_responses.routes import add_responses_routes
from gateway.fronts.transcription import add_audio_routes
from gateway.metrics import GatewayMetrics
from gateway.middleware import GuardMiddleware, RequestIdMiddleware
from gateway.pipeline import Pipeline
from mmserve_core.runtime.logs import get_logger

log = get_logger(__name__)


def create_app(cfg: GatewayConfig) -> FastAPI:
    pipeline = Pipeline(cfg)
    metrics = GatewayMetrics()
    app = FastAPI(title="mmserve gateway", version="0.1.0", lifespan=_lifespan(pipeline, metrics, cfg))
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    _add_error_handlers(app)
    # outermost first: the request id is bound before the guard can answer 401/413
    app.add_middleware(GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    _add_service_routes(app, pipeline, metrics)
    add_chat_routes(app, pipeline, metrics, cfg)
    add_messages_routes(app, pipeline, metrics, cfg)
    add_audio_routes(app, pipeline, metrics, cfg)
    add_responses_routes(app, pipeline, metrics, cfg)
    return app


def _lifespan(pipeline: Pipeline, metrics: GatewayMetrics, cfg: GatewayConfig):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pipeline.open(on_call=lambda svc, addr, outcome: metrics.upstream.labels(svc, addr, outcome).inc())
        chat_server = None
        if cfg.grpc_port is not None:  # the typed gRPC front shares this loop and this pipeline
            from gateway.fronts.grpc_chat.server import start_chat_server

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

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):
        """Routing errors (unknown path, wrong method) in the error shape of the API the path is under."""
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(HTTPError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        type_=type_, code=str(exc.detail).lower().replace(" ", "_")),
                              request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "path", "query"))
        return error_response(HTTPError(400, f"{loc or 'request'}: {first.get('msg', 'invalid')}",
                                        type_="invalid_request_error", param=loc or None, code="invalid_value"),
                              request.url.path)


def _add_service_routes(app: FastAPI, pipeline: Pipeline, metrics: GatewayMetrics) -> None:
    @app.get("/health")
    async def health():
        """200 when both upstreams answer SERVING, else 503 naming which does not."""
        status = await pipeline.upstream_health()
        ok = status["encoder"] == "SERVING" and status["decoder"] == "SERVING"
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

"""The OpenAI-compatible HTTP app: ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Why: OpenAI clients should just work.  A request is parsed and validated,
its media sent to the encoder in one ``Encode`` call, the prompt rendered
with the checkpoint's own template and expanded with the row counts the
encoder returned, and the ids + embeddings streamed to the decoder.  For
``stream: true`` the first decoder message is awaited *before* the SSE
response starts, so an invalid request still gets a proper 4xx, not an error
buried in a 200 stream.  No MLX in this process; everything runs on the
ASGI event loop.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.clients import DecoderClient, EncoderClient, ModelInfo
from gateway.config import GatewayConfig
from gateway.errors import HTTPError, to_http
from gateway.logprobs import LogprobFormatter
from gateway.openai_schema import ChatRequest, parse_chat_request
from gateway.prompt import MediaTokens, PromptBuilder
from gateway.reasoning import ReasoningParser
from mmserve_common import codec
from mmserve_common import types as T
from mmserve_common.logs import REQUEST_ID_HEADER, get_logger, new_request_id, request_id_var
from mmserve_common.tensors import split_rows

log = get_logger(__name__)


class Pipeline:
    """Request pipeline shared by every front: validate, encode, render, decode."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
        # grpc.aio channels bind to the running loop: created in ``open()``.
        self.encoder: EncoderClient = None  # type: ignore[assignment]
        self.decoder: DecoderClient = None  # type: ignore[assignment]
        self._info: ModelInfo | None = None
        self._builder: PromptBuilder | None = None
        self._encoder_modalities: set[str] | None = None
        self.logprobs = LogprobFormatter(self.tokenizer)

    async def open(self) -> None:
        self.encoder = EncoderClient(self.cfg.encoder, self.cfg.rpc_timeout_s)
        self.decoder = DecoderClient(self.cfg.decoder, self.cfg.rpc_timeout_s)

    async def close(self) -> None:
        await self.encoder.close()
        await self.decoder.close()

    async def model_info(self, rid: str) -> tuple[ModelInfo, PromptBuilder]:
        if self._info is None or self._builder is None:
            try:
                info = await self.decoder.model_info(rid)
            except grpc.aio.AioRpcError as e:
                raise to_http(e, upstream="decoder") from None
            tokens = {m: MediaTokens(*t) for m, t in info.media_tokens.items()}
            self._builder = PromptBuilder(self.tokenizer, tokens)
            self._info = info
        return self._info, self._builder

    @property
    def model_id(self) -> str:
        if self.cfg.model_id:
            return self.cfg.model_id
        return self._info.model_id if self._info else self.cfg.checkpoint.rstrip("/").rsplit("/", 1)[-1]

    async def encoder_modalities(self, rid: str) -> set[str]:
        if self._encoder_modalities is None:
            try:
                r = await self.encoder.info(rid)
            except grpc.aio.AioRpcError as e:
                raise to_http(e, upstream="encoder") from None
            self._encoder_modalities = {codec.MODALITY_FROM_PB[m] for m in r.modalities}
        return self._encoder_modalities

    async def prepare(self, req: ChatRequest, rid: str):
        """Encode media and build ``(ids, span embeddings)`` for the decoder."""
        info, builder = await self.model_info(rid)
        rendered = builder.render(req.messages, **req.chat_template_kwargs)
        media_parts = req.media
        encoded: list[T.EncodedItem] = []
        t0 = time.perf_counter()
        if media_parts:
            mods = await self.encoder_modalities(rid)
            for p in media_parts:
                if p.media.modality not in mods:
                    tower = "audio" if p.media.modality == T.AUDIO else "vision"
                    raise HTTPError(400, f"{p.param}: the model's encoder has no {tower} tower, so "
                                    f"{p.media.modality} input cannot be used", type_="invalid_request_error",
                                    param=p.param, code="unsupported_modality")
            try:
                encoded = await self.encoder.encode([p.media for p in media_parts], info.dtype, rid)
            except grpc.aio.AioRpcError as e:
                err = to_http(e, upstream="encoder")
                param = _param_from_items(err.message, media_parts)
                if param:
                    err.param = param
                    err.message = param + err.message[err.message.find("]") + 1 :]
                raise err from None
        encode_ms = (time.perf_counter() - t0) * 1000.0
        built = builder.build(
            rendered,
            [(e.modality, p.param, e.block_rows, e.content_hash) for e, p in zip(encoded, media_parts)],
        )
        block_tensors = [t for e in encoded for t in split_rows(e.tensor, e.block_rows)]
        spans = [T.SpanEmbedding(s, t) for s, t in zip(built.spans, block_tensors, strict=True)]
        return built.ids, spans, encode_ms


def _param_from_items(message: str, parts) -> str | None:
    """Rewrite the encoder's ``items[i]`` into the request's part path."""
    if message.startswith("items["):
        idx = message[6 : message.find("]")]
        if idx.isdigit() and int(idx) < len(parts):
            return parts[int(idx)].param
    return None


def _error_response(err: HTTPError) -> JSONResponse:
    if err.status >= 500:
        log.error("request failed", status=err.status, error=err.message)
    else:
        log.info("request rejected", status=err.status, error=err.message, param=err.param)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _usage(c: T.Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens, "soft_tokens": c.soft_tokens},
    }


def _timings(c: T.Completion, encode_ms: float) -> dict[str, float]:
    return {
        "encode_ms": round(encode_ms, 3),
        "queued_ms": round(c.queued_ms, 3),
        "prefill_ms": round(c.prefill_ms, 3),
        "decode_ms": round(c.decode_ms, 3),
    }


class RequestIdMiddleware:
    """Pure ASGI middleware: take or make ``x-request-id``, bind it for logs, echo it.

    Why not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` pipes
    every response body chunk through an extra in-memory stream and task, which
    for SSE costs more per event than the event itself.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.encode()
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == header), "") or new_request_id()
        rid = rid[:128]
        token = request_id_var.set(rid)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != header]
                message = {**message, "headers": [*headers, (header, rid.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def create_app(cfg: GatewayConfig) -> FastAPI:
    pipeline = Pipeline(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pipeline.open()
        yield
        await pipeline.close()

    app = FastAPI(title="mmserve gateway", version="0.1.0", lifespan=lifespan)
    app.state.pipeline = pipeline

    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": pipeline.model_id, "object": "model", "created": 0, "owned_by": "mmserve"}
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        rid = request_id_var.get() or new_request_id()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"request body is not valid JSON: {e}", type_="invalid_request_error",
                                code="invalid_json") from None
            req = parse_chat_request(body)
            ids, spans, encode_ms = await pipeline.prepare(req, rid)
            call = pipeline.decoder.generate(ids, spans, req.sampling, rid)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as e:
                raise to_http(e, upstream="decoder") from None
            if first is grpc.aio.EOF:
                raise HTTPError(502, "decoder closed the stream without a response", type_="server_error")
        except Exception as e:  # noqa: BLE001 - every failure becomes OpenAI error JSON
            err = to_http(e)
            if err.status >= 500 and not isinstance(e, (HTTPError, grpc.aio.AioRpcError)):
                log.exception("chat completion failed")
            return _error_response(err)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = pipeline.model_id
        if req.stream:
            return StreamingResponse(
                _sse(call, first, completion_id, created, model, req.include_usage, encode_ms,
                     req.return_token_ids, pipeline.logprobs if req.sampling.logprobs else None,
                     _keep_reasoning(req, cfg)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", REQUEST_ID_HEADER: rid},
            )
        return await _complete(call, first, completion_id, created, model, encode_ms,
                               ids if req.return_token_ids else None,
                               pipeline.logprobs if req.sampling.logprobs else None,
                               _keep_reasoning(req, cfg))

    return app


def _keep_reasoning(req: ChatRequest, cfg: GatewayConfig) -> bool:
    return req.include_reasoning if req.include_reasoning is not None else cfg.reasoning == "separate"


async def _responses(call, first):
    yield first
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return
        yield msg


async def _complete(call, first, cid, created, model, encode_ms, prompt_ids=None, logprobs=None,
                    keep_reasoning=True):
    text: list[str] = []
    token_ids: list[int] = []
    lps: list = []
    completion = None
    try:
        async for msg in _responses(call, first):
            if msg.WhichOneof("payload") == "token":
                text.append(msg.token.text)
                token_ids.extend(msg.token.token_ids)
                if logprobs is not None:
                    lps.extend(codec.token_logprobs_from_pb(msg.token))
            else:
                completion = codec.completion_from_pb(msg.complete)
    except grpc.aio.AioRpcError as e:
        return _error_response(to_http(e, upstream="decoder"))
    if completion is not None:
        log.info("completed", stream=False, finish_reason=completion.finish_reason,
                 prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
    if completion is None:
        return _error_response(HTTPError(502, "decoder stream ended without a completion", type_="server_error"))
    content, reasoning = ReasoningParser().feed("".join(text))
    message = {"role": "assistant", "content": content}
    if reasoning and keep_reasoning:
        message["reasoning_content"] = reasoning
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs.content(lps)} if logprobs is not None else None,
        "finish_reason": completion.finish_reason,
    }
    extra = {}
    if prompt_ids is not None:
        choice["token_ids"] = token_ids
        if completion.stop_token_id is not None:
            choice["stop_token_id"] = completion.stop_token_id
        extra["prompt_token_ids"] = prompt_ids
    return JSONResponse({
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(completion),
        "timings": _timings(completion, encode_ms),
        **extra,
    })


def _chunk(cid, created, model, delta, finish_reason=None, token_ids=None, logprobs=None, **extra) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
        **extra,
    }
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _sse(call, first, cid, created, model, include_usage, encode_ms, token_ids=False, logprobs=None,
               keep_reasoning=True):
    """One SSE event per decoder message.  A message may carry several tokens (the
    decoder merges what this stream has not read yet), so one ``delta`` may hold
    several tokens' text, as OpenAI's own streams do; with ``return_token_ids`` the
    chunk lists them."""
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
    parser = ReasoningParser()
    try:
        async for msg in _responses(call, first):
            if msg.WhichOneof("payload") == "token":
                lp = ({"content": logprobs.content(codec.token_logprobs_from_pb(msg.token))}
                      if logprobs is not None and msg.token.token_ids else None)
                content, reasoning = parser.feed(msg.token.text)
                delta = {"content": content}
                if reasoning and keep_reasoning:
                    delta["reasoning_content"] = reasoning
                if token_ids or lp is not None or content or len(delta) > 1:
                    yield _chunk(cid, created, model, delta,
                                 token_ids=list(msg.token.token_ids) if token_ids else None, logprobs=lp)
                continue
            c = codec.completion_from_pb(msg.complete)
            log.info("completed", stream=True, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                     completion_tokens=c.completion_tokens)
            yield _chunk(cid, created, model, {}, c.finish_reason, timings=_timings(c, encode_ms))
            if include_usage:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(c)}
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
    except grpc.aio.AioRpcError as e:
        err = to_http(e, upstream="decoder")
        log.error("stream failed", status=err.status, error=err.message)
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        call.cancel()
    yield "data: [DONE]\n\n"


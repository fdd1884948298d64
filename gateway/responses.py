"""OpenAI response bodies: the non-streamed completion and the SSE stream.

Why: clients parse these byte for byte (the ``openai`` SDK, curl scripts):
role chunk, content deltas, a final chunk with ``finish_reason``, a usage
chunk when asked, ``[DONE]``.  The thought channel is split off here (never
in ``content``), logprobs formatted, and a decoder failure mid-stream is sent
as an error event rather than a cut connection.  Event-loop thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from fastapi.responses import JSONResponse

from gateway.errors import HTTPError, to_http
from gateway.reasoning import ReasoningParser
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import codec
from mmserve_core.wire import types as T

log = get_logger(__name__)


def error_response(err: HTTPError) -> JSONResponse:
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


async def _responses(call, first):
    yield first
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return
        yield msg


async def complete(call, first, cid, created, model, encode_ms, prompt_ids=None, logprobs=None,
                    keep_reasoning=True, disconnected=None):
    """Collect the whole stream into one ``chat.completion``.  ``disconnected`` (an async
    predicate) is polled meanwhile: a client that gives up cancels its decoder sequence."""
    text: list[str] = []
    token_ids: list[int] = []
    lps: list = []
    completion = None
    watcher = asyncio.ensure_future(_cancel_on_disconnect(call, disconnected)) if disconnected else None
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
        return error_response(to_http(e, upstream="decoder"))
    finally:
        if watcher is not None:
            watcher.cancel()
    if completion is not None:
        log.info("completed", stream=False, finish_reason=completion.finish_reason,
                 prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
    if completion is None:
        return error_response(HTTPError(502, "decoder stream ended without a completion", type_="server_error"))
    content, reasoning = ReasoningParser().feed("".join(text))
    message = {"role": "assistant", "content": content}
    if reasoning and keep_reasoning:
        message["reasoning_content"] = reasoning
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs.content_json(lps)} if logprobs is not None else None,
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


async def _cancel_on_disconnect(call, disconnected, interval_s: float = 0.25) -> None:
    while not call.done():
        if await disconnected():
            log.info("client disconnected; cancelling generation")
            call.cancel()
            return
        await asyncio.sleep(interval_s)


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


async def sse(call, first, cid, created, model, include_usage, encode_ms, token_ids=False, logprobs=None,
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
                lp = ({"content": logprobs.content_json(codec.token_logprobs_from_pb(msg.token))}
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


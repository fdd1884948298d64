"""OpenAI response bodies from the pipeline's typed events: the completion and the SSE stream.

Why: clients parse these byte for byte (the ``openai`` SDK, curl scripts):
role chunk, content deltas, a final chunk with ``finish_reason``, a usage
chunk when asked, ``[DONE]``.  The events arrive already split into answer
and thought-channel text (``Delta``); this module only formats them, and a
decoder failure mid-stream is sent as an error event rather than a cut
connection.  No protobuf here.  Event-loop thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.responses import JSONResponse

from gateway.chat import Delta, Done
from gateway.errors import HTTPError, error_body, to_http
from gateway.pipeline import Generation
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T

log = get_logger(__name__)


def error_response(err: HTTPError, path: str = "") -> JSONResponse:
    """The error as the body of the API ``path`` belongs to (``errors.error_body``)."""
    if err.status >= 500:
        log.error("request failed", status=err.status, error=err.message)
    else:
        log.info("request rejected", status=err.status, error=err.message, param=err.param)
    return JSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


def failure_response(exc: BaseException, path: str, what: str, metrics=None) -> JSONResponse:
    """How every HTTP front answers a request that failed before its response began: the error in
    the API's own shape (by ``path``), a traceback logged only for a bug, counted by status.
    Call it inside the ``except`` block (the traceback is the one being handled)."""
    err = to_http(exc)
    if err.status >= 500 and not isinstance(exc, HTTPError):
        log.exception(f"{what} failed")
    if metrics is not None:
        metrics.requests.labels(str(err.status)).inc()
    return error_response(err, path)


def usage(c: T.Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens, "soft_tokens": c.soft_tokens},
    }


def timings(done: Done) -> dict[str, float]:
    c = done.completion
    return {
        "encode_ms": round(done.encode_ms, 3),
        "queued_ms": round(c.queued_ms, 3),
        "prefill_ms": round(c.prefill_ms, 3),
        "decode_ms": round(c.decode_ms, 3),
    }


def _log_done(done: Done, stream: bool) -> None:
    c = done.completion
    log.info("completed", stream=stream, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
             completion_tokens=c.completion_tokens)


async def complete(gen: Generation, cid, created, model, return_ids=False, logprobs=None,
                   keep_reasoning=True, disconnected=None):
    """Collect the events into one ``chat.completion``.  ``disconnected`` (an async predicate) is
    polled meanwhile: a client that gives up cancels its decoder sequence."""
    content: list[str] = []
    reasoning: list[str] = []
    token_ids: list[int] = []
    lps: list[T.TokenLogprob] = []
    done: Done | None = None
    watcher = asyncio.ensure_future(_cancel_on_disconnect(gen, disconnected)) if disconnected else None
    try:
        async for ev in gen.events():
            if isinstance(ev, Delta):
                content.append(ev.content)
                reasoning.append(ev.reasoning)
                token_ids.extend(ev.token_ids)
                lps.extend(ev.logprobs)
            else:
                done = ev
    except HTTPError as e:
        return error_response(e)
    finally:
        if watcher is not None:
            watcher.cancel()
    if done is None:
        return error_response(HTTPError(502, "decoder stream ended without a completion", type_="server_error"))
    _log_done(done, stream=False)
    text = "".join(content)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not done.tool_calls else None}
    if done.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in done.tool_calls]
    thought = "".join(reasoning)
    if thought and keep_reasoning:
        message["reasoning_content"] = thought
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs.content_json(lps)} if logprobs is not None else None,
        "finish_reason": done.finish_reason,
    }
    extra = {}
    if return_ids:
        choice["token_ids"] = token_ids
        if done.completion.stop_token_id is not None:
            choice["stop_token_id"] = done.completion.stop_token_id
        extra["prompt_token_ids"] = done.prompt_ids
    return JSONResponse({
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(done.completion),
        "timings": timings(done),
        **extra,
    })


async def _cancel_on_disconnect(gen: Generation, disconnected, interval_s: float = 0.25) -> None:
    while not gen.done():
        if await disconnected():
            log.info("client disconnected; cancelling generation")
            gen.cancel()
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


def _tool_call_delta(d) -> dict[str, Any]:
    """OpenAI's streamed call piece: index, id, type and name first, then argument fragments."""
    if d.id is not None:
        return {"index": d.index, "id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments}}
    return {"index": d.index, "function": {"arguments": d.arguments}}


async def sse(gen: Generation, cid, created, model, include_usage, token_ids=False, logprobs=None,
              keep_reasoning=True):
    """One SSE event per ``Delta``.  A delta may carry several tokens (the decoder merges what
    this stream has not read yet), as OpenAI's own streams do; with ``return_token_ids`` the
    chunk lists them."""
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
    try:
        async for ev in gen.events():
            if isinstance(ev, Delta):
                lp = ({"content": logprobs.content_json(ev.logprobs)}
                      if logprobs is not None and ev.token_ids else None)
                delta: dict[str, Any] = {"content": ev.content}
                if ev.reasoning and keep_reasoning:
                    delta["reasoning_content"] = ev.reasoning
                if ev.tool_calls:
                    delta["tool_calls"] = [_tool_call_delta(d) for d in ev.tool_calls]
                    if not ev.content:
                        del delta["content"]
                if token_ids or lp is not None or ev.content or len(delta) > 1 or ev.tool_calls:
                    yield _chunk(cid, created, model, delta, token_ids=ev.token_ids if token_ids else None,
                                 logprobs=lp)
                continue
            _log_done(ev, stream=True)
            yield _chunk(cid, created, model, {}, ev.finish_reason, timings=timings(ev))
            if include_usage:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(ev.completion)}
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
    except HTTPError as err:
        log.error("stream failed", status=err.status, error=err.message)
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        gen.cancel()
    yield "data: [DONE]\n\n"

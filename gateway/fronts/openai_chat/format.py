"""OpenAI response bodies from the pipeline's typed events: the completion and the SSE stream.

Why: clients parse these byte for byte (the ``openai`` SDK, curl scripts):
role chunk, content deltas, a final chunk with ``finish_reason``, a usage
chunk when asked, ``[DONE]``.  The events arrive already split into answer
and thought-channel text (``Delta``); this module only formats them, and a
decoder failure mid-stream is sent as an error event rather than a cut
connection.  No protobuf here.  Event-loop thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.errors import HTTPError
from gateway.events import Delta, Done
from gateway.pipeline import Generation
from gateway.reply import Folded, no_done
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T

log = get_logger(__name__)


def usage(c: T.Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens, "soft_tokens": c.soft_tokens},
    }


def timings(done: Done) -> dict[str, float | int]:
    c = done.completion
    return {
        "encode_ms": round(done.encode_ms, 3),
        "queued_ms": round(c.queued_ms, 3),
        "prefill_ms": round(c.prefill_ms, 3),
        "decode_ms": round(c.decode_ms, 3),
        "draft_tokens": c.draft_tokens,  # MTP drafting (--draft-model): proposed, and verified + emitted
        "draft_accepted_tokens": c.draft_accepted_tokens,
    }


@dataclass(frozen=True)
class ChatReply:
    """What a ``chat.completion`` names besides the events: its id, time, model and options."""

    cid: str
    created: int
    model: str
    service_tier: str = "default"
    return_ids: bool = False
    logprobs: Any = None  # a LogprobFormatter when the request asked for logprobs
    keep_reasoning: bool = True


def completion_body(r: ChatReply, got: Folded) -> dict[str, Any]:
    """The ``chat.completion`` object (OpenAI's ``CreateChatCompletionResponse``)."""
    done = got.done
    assert done is not None
    text = got.text
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not done.tool_calls else None,
                               "refusal": None}
    if done.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in done.tool_calls]
    thought = got.thought
    if thought and r.keep_reasoning:
        message["reasoning_content"] = thought
    choice = {
        "index": 0,
        "message": message,
        "logprobs": ({"content": r.logprobs.content_json(got.logprobs), "refusal": None}
                     if r.logprobs is not None else None),
        "finish_reason": done.finish_reason,
    }
    extra = {}
    if r.return_ids:
        choice["token_ids"] = got.token_ids
        if done.completion.stop_token_id is not None:
            choice["stop_token_id"] = done.completion.stop_token_id
        extra["prompt_token_ids"] = done.prompt_ids
    return {
        "id": r.cid,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [choice],
        "usage": usage(done.completion),
        "service_tier": r.service_tier,
        "timings": timings(done),
        **extra,
    }


def _chunk(r: ChatReply, delta, finish_reason=None, token_ids=None, logprobs=None, **extra) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {
        "id": r.cid,
        "object": "chat.completion.chunk",
        "created": r.created,
        "model": r.model,
        "service_tier": r.service_tier,
        "choices": [choice],
        **extra,
    }
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def tool_call_deltas(pieces) -> list[dict[str, Any]]:
    """OpenAI's streamed call pieces, **one entry per call index** in a chunk: the index, id, type
    and name when the call starts, then its argument fragments (pieces of one call that arrived in
    one delta are joined — clients such as instructor read ``tool_calls[0]`` as the whole piece)."""
    out: list[dict[str, Any]] = []
    for d in pieces:
        if out and out[-1]["index"] == d.index and d.id is None:
            out[-1]["function"]["arguments"] += d.arguments
        elif d.id is not None:
            out.append({"index": d.index, "id": d.id, "type": "function",
                        "function": {"name": d.name, "arguments": d.arguments}})
        else:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out


async def chunks(gen: Generation, r: ChatReply, include_usage: bool, on_complete=None):
    """One SSE event per ``Delta``.  A delta may carry several tokens (the decoder merges what
    this stream has not read yet), as OpenAI's own streams do; with ``return_token_ids`` the
    chunk lists them.  ``on_complete`` gets the whole reply as one ``chat.completion``
    (``store: true``)."""
    got = Folded()
    yield _chunk(r, {"role": "assistant", "content": ""})
    try:
        async for ev in gen.events():
            got.add(ev)
            if isinstance(ev, Delta):
                lp = ({"content": r.logprobs.content_json(ev.logprobs), "refusal": None}
                      if r.logprobs is not None and ev.token_ids else None)
                delta: dict[str, Any] = {"content": ev.content}
                if ev.reasoning and r.keep_reasoning:
                    delta["reasoning_content"] = ev.reasoning
                if ev.tool_calls:
                    delta["tool_calls"] = tool_call_deltas(ev.tool_calls)
                    if not ev.content:
                        del delta["content"]
                if r.return_ids or lp is not None or ev.content or len(delta) > 1 or ev.tool_calls:
                    yield _chunk(r, delta, token_ids=ev.token_ids if r.return_ids else None, logprobs=lp)
                continue
            log.info("completed", stream=True, finish_reason=ev.finish_reason, **usage(ev.completion))
            yield _chunk(r, {}, ev.finish_reason, timings=timings(ev))
            if include_usage:
                body = {"id": r.cid, "object": "chat.completion.chunk", "created": r.created, "model": r.model,
                        "service_tier": r.service_tier, "choices": [], "usage": usage(ev.completion)}
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
            if on_complete is not None:
                on_complete(completion_body(r, got))
        if got.done is None:
            raise no_done()
    except HTTPError as err:
        log.error("stream failed", status=err.status, error=err.message)
        yield f"data: {json.dumps(err.body())}\n\n"
    yield "data: [DONE]\n\n"

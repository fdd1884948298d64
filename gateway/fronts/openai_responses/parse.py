"""The OpenAI Responses front's parser: a ``/v1/responses`` body -> the typed ``ChatRequest``.

Why: the Responses API sends a conversation as *items* — messages (``input_text``,
``input_image``, ``input_audio`` parts; ``output_text`` in assistant turns), ``function_call``
and ``function_call_output`` items, ``reasoning`` items — and continues one by
``previous_response_id``.  Items become the typed messages every front shares: consecutive
``function_call`` items are one assistant turn's ``tool_calls``, a ``function_call_output`` a
role-``tool`` message, a ``reasoning`` item the next assistant turn's reasoning.
``instructions`` is this request's system message only (as OpenAI documents, it is not carried
over from a previous response).  Fields and bounds come from the shared table; anything this
server cannot honour is a 400 naming it.  Pure Python, event-loop thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.request import (
    ChatRequest,
    Message,
    Part,
    audio_content,
    bad,
    check_tool_choice,
    check_tool_history,
    check_tools,
    each_object,
    image_content,
    media_role,
    parse_fields,
    refuse_unknown,
    text_of,
    valid_text,
)
from gateway.request_options import apply_effort, openai_routing, reasoning_effort
from gateway.video_parts import VIDEO_OPTIONS, video_content, video_options
from mmserve_core.wire import types as T

# sampling fields OpenAI's Responses API lacks but its chat API has (vLLM takes them too): same table,
# same bounds as chat completions
EXTENSIONS = ("logit_bias", "seed", "top_k", "min_p", "stop", "presence_penalty", "frequency_penalty",
              "repetition_penalty")
BODY_KEYS = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                       "reasoning", "max_output_tokens", "temperature", "top_p", "store", "previous_response_id",
                       "metadata", "stream", "user", "truncation", "include", "service_tier", "prompt_cache_key",
                       "safety_identifier", *EXTENSIONS})
SCHEMA_PATH = "tools[{i}].parameters"


@dataclass
class ResponsesRequest:
    """The typed request plus what the Responses front itself keeps: the echoed fields and how
    this turn's items look when listed (``input_items``)."""

    chat: ChatRequest
    input_items: list[dict]
    previous_response_id: str | None
    store: bool
    instructions: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    echo: dict[str, Any] = field(default_factory=dict)  # fields returned as sent (tools, text, ...)


def _parts(content: Any, role: str, param: str, allow_urls: bool) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", param, text=valid_text(content, param))]
    out = []
    for pp, part in each_object(content, param, what="a string or a list of content parts"):
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            refuse_unknown(part, {"type", "text", "annotations", "logprobs"} if kind == "output_text"
                            else {"type", "text"}, pp)
            if kind == "output_text" and role != "assistant":
                raise bad(f"{pp}: output_text is for assistant turns", pp)
            out.append(Part("text", pp, text=text_of(part, pp)))
        elif kind == "input_image":
            refuse_unknown(part, {"type", "image_url", "detail"}, pp)
            media_role(role, "image", pp)
            out.append(image_content(part.get("image_url"), part.get("detail", "auto"), pp, allow_urls,
                                     url_param=f"{pp}.image_url", detail_param=f"{pp}.detail"))
        elif kind == "input_audio":
            refuse_unknown(part, {"type", "input_audio"}, pp)
            media_role(role, "audio", pp)
            out.append(audio_content(part.get("input_audio"), pp))
        elif kind == "input_video":  # mmserve's extension, shaped as input_image: the URL beside its options
            refuse_unknown(part, {"type", "video_url", *VIDEO_OPTIONS}, pp)
            media_role(role, "video", pp)
            out.append(video_content(part.get("video_url"), video_options(part, pp), pp, allow_urls,
                                     url_param=f"{pp}.video_url", options_param=pp))
        else:
            raise bad(f"{pp}: unsupported content part type {kind!r}; use input_text, input_image, input_audio or "
                      "input_video", pp)
    return out


def _items(raw: Any, allow_urls: bool) -> tuple[list[Message], list[dict]]:
    """Input items -> (messages, the items as stored for ``input_items``)."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not raw:
        raise bad("input must be a string or a non-empty list of items", "input")
    messages: list[Message] = []
    reasoning = ""
    for param, item in each_object(raw, "input", what="a string or a non-empty list of items"):
        kind = item.get("type", "message")
        if kind == "message":
            refuse_unknown(item, {"type", "role", "content", "id", "status"}, param)
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad(f"{param}.role must be user, system, developer or assistant, got {role!r}", f"{param}.role")
            parts = _parts(item.get("content"), role, f"{param}.content", allow_urls)
            messages.append(Message(role, parts, param, reasoning=reasoning if role == "assistant" else ""))
            reasoning = "" if role == "assistant" else reasoning
        elif kind == "function_call":
            refuse_unknown(item, {"type", "call_id", "name", "arguments", "id", "status"}, param)
            for k in ("call_id", "name", "arguments"):
                if not isinstance(item.get(k), str) or (k != "arguments" and not item[k]):
                    raise bad(f"{param}.{k} must be a string", f"{param}.{k}")
            try:
                ok = isinstance(json.loads(item["arguments"] or "{}"), dict)
            except (json.JSONDecodeError, RecursionError):
                ok = False
            if not ok:
                raise bad(f"{param}.arguments must be a JSON object, as text", f"{param}.arguments")
            call = T.ToolCall(item["call_id"], item["name"], item["arguments"] or "{}")
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and (last.tool_calls or not last.parts):
                last.tool_calls.append(call)
            else:
                messages.append(Message("assistant", [], param, tool_calls=[call], reasoning=reasoning))
                reasoning = ""
        elif kind == "function_call_output":
            refuse_unknown(item, {"type", "call_id", "output", "id", "status"}, param)
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise bad(f"{param} needs a string call_id and output", param)
            messages.append(Message("tool", [Part("text", param, text=valid_text(item["output"], f"{param}.output"))],
                                    param, tool_call_id=item["call_id"]))
        elif kind == "reasoning":
            refuse_unknown(item, {"type", "id", "summary", "content", "status"}, param)
            texts = [c.get("text", "") for c in item.get("content") or [] if isinstance(c, dict)]
            if not all(isinstance(t, str) for t in texts):
                raise bad(f"{param}.content must hold reasoning_text parts", f"{param}.content")
            reasoning += "".join(texts)
        else:
            raise bad(f"{param}.type {kind!r} is not supported; use message, function_call, function_call_output "
                      "or reasoning", f"{param}.type")
    return messages, [dict(item) if isinstance(item, dict) else item for item in raw]


def _tools(raw: Any) -> tuple[list[T.Tool], bool]:
    if raw is None:
        return [], False
    tools, strict = [], False
    for param, t in each_object(raw, "tools"):
        if t.get("type") != "function":
            raise bad(f"{param}.type {t.get('type')!r}: only function tools run here (no hosted tools)",
                      f"{param}.type")
        refuse_unknown(t, {"type", "name", "description", "parameters", "strict"}, param)
        if not isinstance(t.get("name"), str) or not isinstance(t.get("description") or "", str):
            raise bad(f"{param} needs a string name (and description)", f"{param}.name")
        if t.get("strict") is not None and not isinstance(t["strict"], bool):
            raise bad(f"{param}.strict must be a boolean", f"{param}.strict")
        strict = strict or t.get("strict") is not False  # the Responses API's documented default: strict
        tools.append(T.Tool(t["name"], t.get("description") or "", t.get("parameters")))
    check_tools(tools, where="tools[{i}]", schema=SCHEMA_PATH)
    return tools, strict


def _format(text: Any) -> T.Constraint | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad("text must be an object", "text")
    refuse_unknown(text, {"format"}, "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        refuse_unknown(fmt, {"type"}, "text.format")
        return None
    if kind == "json_object":
        refuse_unknown(fmt, {"type"}, "text.format")
        return T.Constraint("json_object")
    if kind == "json_schema":
        refuse_unknown(fmt, {"type", "name", "schema", "strict", "description"}, "text.format")
        if not isinstance(fmt.get("schema"), dict):
            raise bad("text.format.schema must be a JSON Schema object", "text.format.schema")
        return T.Constraint("json_schema", json.dumps(fmt["schema"]))
    raise bad(f"text.format.type must be text, json_object or json_schema, got {kind!r}", "text.format.type")


def _checked_scalars(body: dict) -> str:
    """Type checks of the plain fields; returns the truncation mode."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions must be a string", "instructions")
    for name, want in (("store", bool), ("stream", bool), ("parallel_tool_calls", bool), ("model", str),
                       ("previous_response_id", str), ("user", str), ("safety_identifier", str)):
        if body.get(name) is not None and not isinstance(body[name], want):
            raise bad(f"{name} must be a {want.__name__}", name)
    truncation = body.get("truncation") or "disabled"
    if truncation not in ("disabled", "auto"):
        raise bad(f"truncation must be 'auto' or 'disabled', got {truncation!r}", "truncation")
    if body.get("include"):
        raise bad("include: no extra output fields are supported", "include")
    return truncation


def _effort(reasoning: Any):
    """``reasoning``: its ``effort`` (``summary`` is refused: no summaries are made)."""
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise bad("reasoning must be an object", "reasoning")
    refuse_unknown(reasoning, {"effort", "summary"}, "reasoning")
    if reasoning.get("summary") is not None:
        raise bad("reasoning.summary: summaries of the thought are not produced; the thought itself comes back "
                  "as a reasoning item", "reasoning.summary")
    return reasoning_effort(reasoning.get("effort"), "reasoning.effort")


def _tool_choice(tc: Any, chat: ChatRequest) -> None:
    if tc is None:
        chat.tool_choice = "auto" if chat.tools else "none"
    elif isinstance(tc, str):
        chat.tool_choice = tc
    elif isinstance(tc, dict) and tc.get("type") == "function":
        refuse_unknown(tc, {"type", "name"}, "tool_choice")
        chat.tool_choice, chat.tool_name = "function", tc.get("name")
    else:
        raise bad("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
                  "tool_choice")
    check_tool_choice(chat)


def _echo(body: dict) -> dict[str, Any]:
    """The fields a Response object returns as they were sent — tools whole (every field present,
    ``strict`` as it was applied)."""
    echo = {k: body.get(k) for k in ("tool_choice", "text", "temperature", "top_p", "max_output_tokens",
                                     "user", "reasoning", "prompt_cache_key", "safety_identifier")}
    echo["tools"] = [{"type": "function", "name": t["name"], "description": t.get("description"),
                      "parameters": t.get("parameters"), "strict": t.get("strict") is not False}
                     for t in body.get("tools") or []]
    return echo


def parse_responses_request(body: Any, *, allow_urls: bool = False) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", None)
    refuse_unknown(body, BODY_KEYS, "")
    messages, items = _items(body.get("input"), allow_urls)
    truncation = _checked_scalars(body)
    routing = openai_routing(body)
    effort = _effort(body.get("reasoning"))
    thinking = effort is not None and effort.thinking
    sampling, _ = parse_fields({"max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
                                "top_p": body.get("top_p"), **{k: body.get(k) for k in EXTENSIONS}})
    kwargs: dict = {}
    apply_effort(effort, kwargs, sampling, "reasoning.effort")
    sampling.constraint = _format(body.get("text"))
    tools, strict = _tools(body.get("tools"))
    chat = ChatRequest(model=body.get("model"), messages=messages, stream=bool(body.get("stream")), sampling=sampling,
                       include_reasoning=thinking, tools=tools, strict_tools=strict,
                       parallel_tool_calls=body.get("parallel_tool_calls", True) is not False,
                       chat_template_kwargs=kwargs if thinking else {}, tool_schema_path=SCHEMA_PATH,
                       truncation=truncation, **routing)
    if sampling.constraint is not None:
        chat.constraint_param = "text.format"
    _tool_choice(body.get("tool_choice"), chat)
    return ResponsesRequest(chat, items, body.get("previous_response_id"), body.get("store", True) is not False,
                            body.get("instructions"), routing["metadata"], _echo(body))


def conversation(prior: list[Message], req: ResponsesRequest) -> list[Message]:
    """The messages the model sees: this request's instructions, the stored conversation, this input."""
    system = [Message("system", [Part("text", "instructions", text=req.instructions)], "instructions")] \
        if req.instructions else []
    messages = [*system, *prior, *req.chat.messages]
    check_tool_history(messages)
    return messages

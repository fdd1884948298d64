"""The Anthropic Messages front's parser: a ``/v1/messages`` body -> the gateway's typed ``ChatRequest``.

Why: Anthropic's clients (the SDK, agent tools, coding assistants) send ``system`` as a string or
a list of text blocks, content as typed blocks, tool results inside user turns and tool calls
inside assistant turns.  Each becomes what every front shares: ``system`` one system message
(its text joined — a list handed to a template that expects a string renders twice), a user
turn's ``tool_result`` blocks role-``tool`` messages before the rest of the turn, an assistant
turn's ``tool_use`` blocks its ``tool_calls`` and its ``thinking`` blocks its reasoning (the
template decides whether an earlier thought is shown).  Audio and video are extension blocks,
since Anthropic has neither: ``{"type": "audio", "source": {"type": "base64", "media_type": "audio/wav",
"data": …}}``, ``{"type": "video", "source": …, "fps"?, "max_frames"?, "audio_track"?}``.  Any key or block this server cannot honour is a 400 naming it.
Pure Python, event-loop thread.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.request import (
    ChatRequest,
    Message,
    Part,
    audio_part,
    b64,
    bad,
    check_tool_choice,
    check_tool_history,
    check_tools,
    each_object,
    image_part,
    media_role,
    parse_fields,
    refuse_unknown,
    text_of,
    valid_text,
)
from gateway.request_options import ANTHROPIC_TIERS, service_tier
from gateway.video_parts import VIDEO_MIME, VIDEO_OPTIONS, video_content, video_options
from mmserve_core.wire import types as T

BODY_KEYS = frozenset({"model", "messages", "max_tokens", "system", "stream", "temperature", "top_p", "top_k",
                       "stop_sequences", "metadata", "tools", "tool_choice", "thinking", "service_tier"})
COUNT_KEYS = BODY_KEYS - {"max_tokens", "stream", "temperature", "top_p", "top_k", "stop_sequences", "metadata",
                          "service_tier"}
AUDIO_TYPES = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3",
               "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
MIN_THINKING_BUDGET = 1024  # Anthropic's own lower bound
SCHEMA_PATH = "tools[{i}].input_schema"


def _b64(data: Any, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"{param} must be a non-empty base64 string", param)
    return b64(data, param)


# Block keys every block may carry: cache_control is a caching hint, and the decoder's prefix cache
# keeps every prompt's KV anyway, so it is honoured by what the server always does.
_COMMON = {"type", "cache_control"}


def _image(block: dict, param: str, allow_urls: bool) -> Part:
    refuse_unknown(block, _COMMON | {"source"}, param)
    src = block.get("source")
    if not isinstance(src, dict):
        raise bad(f"{param}.source must be an object", f"{param}.source")
    kind = src.get("type")
    if kind == "base64":
        refuse_unknown(src, {"type", "media_type", "data"}, f"{param}.source")
        mime = src.get("media_type")
        if mime not in IMAGE_TYPES:
            raise bad(f"{param}.source.media_type must be one of {', '.join(IMAGE_TYPES)}", f"{param}.source.media_type")
        return image_part(_b64(src.get("data"), f"{param}.source.data"), mime, "auto", param,
                          detail_param=f"{param}.source")
    if kind == "url":
        refuse_unknown(src, {"type", "url"}, f"{param}.source")
        url = src.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise bad(f"{param}.source.url must be an http(s) URL", f"{param}.source.url")
        if not allow_urls:
            raise bad("fetching image URLs is disabled on this server; send the image as a base64 source",
                      f"{param}.source.url")
        p = image_part(b"", "", "auto", param, detail_param=f"{param}.source")
        p.url, p.url_param = url, f"{param}.source.url"
        return p
    raise bad(f"{param}.source.type must be 'base64' or 'url', got {kind!r}", f"{param}.source.type")


def _audio(block: dict, param: str) -> Part:
    refuse_unknown(block, _COMMON | {"source"}, param)
    src = block.get("source")
    if not isinstance(src, dict) or src.get("type") != "base64":
        raise bad(f"{param}.source must be a base64 source", f"{param}.source")
    refuse_unknown(src, {"type", "media_type", "data"}, f"{param}.source")
    fmt = AUDIO_TYPES.get(src.get("media_type") or "")
    if fmt is None:
        raise bad(f"{param}.source.media_type must be one of {', '.join(AUDIO_TYPES)}", f"{param}.source.media_type")
    return audio_part(_b64(src.get("data"), f"{param}.source.data"), fmt, param)


def _video(block: dict, param: str, allow_urls: bool) -> Part:
    """mmserve's extension block: ``{"type": "video", "source": {"type": "base64", "media_type": "video/mp4",
    "data": …} | {"type": "url", "url": …}, "fps"?, "max_frames"?, "audio_track"?}``."""
    refuse_unknown(block, _COMMON | {"source", *VIDEO_OPTIONS}, param)
    options = video_options(block, param)
    src = block.get("source")
    if not isinstance(src, dict) or src.get("type") not in ("base64", "url"):
        raise bad(f"{param}.source must be a base64 or url source", f"{param}.source")
    if src["type"] == "url":
        refuse_unknown(src, {"type", "url"}, f"{param}.source")
        url = src.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise bad(f"{param}.source.url must be an http(s) URL", f"{param}.source.url")
        return video_content(url, options, param, allow_urls, url_param=f"{param}.source.url", options_param=param)
    refuse_unknown(src, {"type", "media_type", "data"}, f"{param}.source")
    mime = src.get("media_type")
    if not isinstance(mime, str) or not mime.startswith(VIDEO_MIME):
        raise bad(f"{param}.source.media_type must be video/* (or image/gif), got {mime!r}", f"{param}.source.media_type")
    media = T.MediaInput(T.VIDEO, _b64(src.get("data"), f"{param}.source.data"), mime, video=options)
    return Part("video", param, media=media, options_param=param)


def _text(block: dict, param: str) -> str:
    refuse_unknown(block, _COMMON | {"text"}, param)
    return text_of(block, param)


def _blocks(content: Any, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for _, b in each_object(content, param, what="a string or a list of content blocks")]


def _tool_result(block: dict, param: str) -> Message:
    refuse_unknown(block, _COMMON | {"tool_use_id", "content", "is_error"}, param)
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise bad(f"{param}.tool_use_id must be the id of the tool_use this answers", f"{param}.tool_use_id")
    if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
        raise bad(f"{param}.is_error must be a boolean", f"{param}.is_error")
    texts = []
    for j, b in enumerate(_blocks(block.get("content", ""), f"{param}.content")):
        if b.get("type") != "text":
            raise bad(f"{param}.content[{j}]: a tool result can only hold text here", f"{param}.content[{j}]")
        texts.append(_text(b, f"{param}.content[{j}]"))
    text = "".join(texts)
    if block.get("is_error"):  # Gemma 4 has no error flag on a result: it is said in the result
        text = f"Error: {text}"
    return Message("tool", [Part("text", param, text=text)], param, tool_call_id=block["tool_use_id"])


def _user(content: Any, param: str, allow_urls: bool) -> list[Message]:
    results: list[Message] = []
    parts: list[Part] = []
    for j, b in enumerate(_blocks(content, f"{param}.content")):
        bp, kind = f"{param}.content[{j}]", b.get("type")
        if kind == "text":
            parts.append(Part("text", bp, text=_text(b, bp)))
        elif kind == "image":
            media_role("user", "image", bp)
            parts.append(_image(b, bp, allow_urls))
        elif kind == "audio":
            parts.append(_audio(b, bp))
        elif kind == "video":
            media_role("user", "video", bp)
            parts.append(_video(b, bp, allow_urls))
        elif kind == "tool_result":
            if parts:
                raise bad(f"{bp}: tool_result blocks must come before other content in a user turn", bp)
            results.append(_tool_result(b, bp))
        else:
            raise bad(f"{bp}: unsupported content block type {kind!r} in a user turn; use text, image, audio or "
                      "video (this server's extensions) or tool_result", bp)
    return [*results, *([Message("user", parts, param)] if parts or not results else [])]


def _assistant(content: Any, param: str) -> Message:
    text: list[str] = []
    thought: list[str] = []
    calls: list[T.ToolCall] = []
    for j, b in enumerate(_blocks(content, f"{param}.content")):
        bp, kind = f"{param}.content[{j}]", b.get("type")
        if kind == "text":
            text.append(_text(b, bp))
        elif kind == "thinking":
            refuse_unknown(b, _COMMON | {"thinking", "signature"}, bp)
            thought.append(text_of(b, bp, "thinking"))
        elif kind == "tool_use":
            refuse_unknown(b, _COMMON | {"id", "name", "input"}, bp)
            if not isinstance(b.get("id"), str) or not b["id"] or not isinstance(b.get("name"), str):
                raise bad(f"{bp} needs a string id and name", bp)
            if not isinstance(b.get("input", {}), dict):
                raise bad(f"{bp}.input must be an object", f"{bp}.input")
            calls.append(T.ToolCall(b["id"], valid_text(b["name"], f"{bp}.name"),
                                    json.dumps(b.get("input", {}), ensure_ascii=False)))
        else:
            if kind in ("image", "audio", "video"):
                media_role("assistant", kind, bp)  # says media belong in user turns
            raise bad(f"{bp}: unsupported content block type {kind!r} in an assistant turn; use text, thinking or "
                      "tool_use", bp)
    parts = [Part("text", f"{param}.content", text="".join(text))] if text else []
    return Message("assistant", parts, param, tool_calls=calls, reasoning="".join(thought))


def _system(system: Any) -> list[Message]:
    if system is None:
        return []
    if isinstance(system, str):
        return [Message("system", [Part("text", "system", text=valid_text(system, "system"))], "system")]
    texts = []
    for j, b in enumerate(_blocks(system, "system")):
        if b.get("type") != "text":
            raise bad(f"system[{j}]: system blocks must be text", f"system[{j}]")
        texts.append(_text(b, f"system[{j}]"))
    # one string, joined: a template given a list of blocks where it expects a string renders it twice
    return [Message("system", [Part("text", "system", text="\n".join(texts))], "system")]


def _tools(raw: Any) -> list[T.Tool]:
    if raw is None:
        return []
    tools = []
    for param, t in each_object(raw, "tools"):
        if t.get("type", "custom") != "custom":
            raise bad(f"{param}.type {t.get('type')!r}: server tools are not run by this server; declare client "
                      "tools (name, description, input_schema)", f"{param}.type")
        refuse_unknown(t, {"type", "name", "description", "input_schema", "cache_control"}, param)
        if not isinstance(t.get("name"), str) or not isinstance(t.get("description", ""), str):
            raise bad(f"{param} needs a string name (and description)", f"{param}.name")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise bad(f"{param}.input_schema must be a JSON Schema object", f"{param}.input_schema")
        tools.append(T.Tool(t["name"], t.get("description", ""), schema))
    check_tools(tools, where="tools[{i}]", schema=SCHEMA_PATH)
    return tools


def _tool_choice(raw: Any, req: ChatRequest) -> None:
    if raw is None:
        req.tool_choice = "auto" if req.tools else "none"
        return
    if not isinstance(raw, dict):
        raise bad("tool_choice must be an object with a type", "tool_choice")
    kind = raw.get("type")
    refuse_unknown(raw, {"type", "name", "disable_parallel_tool_use"} if kind == "tool" else
                    {"type", "disable_parallel_tool_use"} if kind in ("auto", "any") else {"type"}, "tool_choice")
    mapping = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
    if kind not in mapping:
        raise bad(f"tool_choice.type must be auto, any, tool or none, got {kind!r}", "tool_choice.type")
    req.tool_choice, req.tool_name = mapping[kind], raw.get("name")
    dp = raw.get("disable_parallel_tool_use")
    if dp is not None and not isinstance(dp, bool):
        raise bad("tool_choice.disable_parallel_tool_use must be a boolean", "tool_choice.disable_parallel_tool_use")
    req.parallel_tool_calls = not dp
    check_tool_choice(req)


def _thinking(raw: Any, max_tokens: int | None) -> tuple[bool, int | None]:
    """``(enabled, budget)``; the budget is enforced by the decoder (the thought channel is closed
    when it is spent)."""
    if raw is None:
        return False, None
    if not isinstance(raw, dict) or raw.get("type") not in ("enabled", "disabled"):
        raise bad("thinking must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}",
                  "thinking")
    if raw["type"] == "disabled":
        refuse_unknown(raw, {"type"}, "thinking")
        return False, None
    refuse_unknown(raw, {"type", "budget_tokens"}, "thinking")
    budget = raw.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
        raise bad(f"thinking.budget_tokens must be an integer of at least {MIN_THINKING_BUDGET}",
                  "thinking.budget_tokens")
    if max_tokens is not None and budget >= max_tokens:
        raise bad("thinking.budget_tokens must be less than max_tokens", "thinking.budget_tokens")
    return True, budget


def parse_messages_request(body: Any, *, allow_urls: bool = False, counting: bool = False) -> ChatRequest:
    """Validate a Messages body (``counting``: a ``count_tokens`` body, no sampling) into the typed request."""
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", None)
    refuse_unknown(body, COUNT_KEYS if counting else BODY_KEYS, "")
    if not counting and body.get("max_tokens") is None:
        raise bad("max_tokens is required", "max_tokens")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    messages = _system(body.get("system"))
    for param, m in each_object(msgs, "messages"):
        refuse_unknown(m, {"role", "content"}, param)
        role = m.get("role")
        if role == "user":
            messages += _user(m.get("content"), param, allow_urls)
        elif role == "assistant":
            messages.append(_assistant(m.get("content"), param))
        else:
            raise bad(f"{param}.role must be 'user' or 'assistant', got {role!r}", f"{param}.role")
    check_tool_history(messages)
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise bad("stop_sequences must be a list of non-empty strings", "stop_sequences")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 1):
        raise bad("temperature must be a number between 0 and 1", "temperature")
    values = {k: body.get(k) for k in ("max_tokens", "temperature", "top_p", "top_k")}
    values["stop"] = stops or None
    sampling, _ = parse_fields(values)
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise bad("metadata must be an object", "metadata")
        refuse_unknown(meta, {"user_id"}, "metadata")
        if meta.get("user_id") is not None and not isinstance(meta["user_id"], str):
            raise bad("metadata.user_id must be a string", "metadata.user_id")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model must be a string", "model")
    thinking, budget = _thinking(body.get("thinking"), body.get("max_tokens"))
    sampling.reasoning_budget = budget
    tier = service_tier(body.get("service_tier"), ANTHROPIC_TIERS)
    req = ChatRequest(model=model, messages=messages, stream=stream, sampling=sampling,
                      include_reasoning=thinking, tools=_tools(body.get("tools")),
                      chat_template_kwargs={"enable_thinking": True} if thinking else {},
                      tool_schema_path=SCHEMA_PATH, priority=tier.priority, service_tier=tier.served)
    _tool_choice(body.get("tool_choice"), req)
    return req

"""The OpenAI front's parser: a chat-completions body -> the gateway's typed ``ChatRequest``.

Why: a client mistake must come back as a 400 that names the exact field
(``messages[2].content[1]``), and no content part may be silently ignored:
a part we cannot handle is an error, not a skip.  Only what is OpenAI's own
lives here — JSON shapes, base64 and data: URIs, ``image_url`` /
``input_audio`` parts, ``stream_options``; the request fields (types,
bounds) and the media rules come from ``gateway.request``, which every front
shares.  Checking that bytes are a real image or clip is the encoder's job.
Pure Python, event-loop thread.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.request import (
    ROLES,
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
from mmserve_core.wire import fields as F
from mmserve_core.wire import types as T

# Template variables a request must not override (they are the prompt itself).
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                            "tokenize", "bos_token", "eos_token", "pad_token", "unk_token", "chat_template",
                            "return_dict", "return_assistant_tokens_mask"}


def _parts(content: Any, role: str, param: str, allow_urls: bool) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", param, text=valid_text(content, param))]
    if content is None and role == "assistant":
        return []
    out = []
    for pp, part in each_object(content, param, what="a string or a list of content parts"):
        kind = part.get("type")
        if kind == "text":
            out.append(Part("text", pp, text=text_of(part, pp)))
        elif kind == "image_url":
            media_role(role, "image", pp)
            spec = part.get("image_url")
            url, detail = (spec.get("url"), spec.get("detail", "auto")) if isinstance(spec, dict) else (spec, "auto")
            out.append(image_content(url, detail, pp, allow_urls, url_param=f"{pp}.image_url.url",
                                     detail_param=f"{pp}.image_url.detail"))
        elif kind == "input_audio":
            media_role(role, "audio", pp)
            out.append(audio_content(part.get("input_audio"), pp))
        elif kind == "video_url":
            media_role(role, "video", pp)
            out.append(_video(part, pp, allow_urls))
        else:
            raise bad(f"{pp}: unsupported content part type {kind!r}; use text, image_url, input_audio or video_url",
                      pp)
    return out


def _video(part: dict, pp: str, allow_urls: bool) -> Part:
    """``{"type": "video_url", "video_url": {"url": ..., "fps"?, "max_frames"?, "audio_track"?}}`` (vLLM's
    part, with mmserve's sampling and track options beside the URL)."""
    refuse_unknown(part, {"type", "video_url"}, pp)
    spec = part.get("video_url")
    where = f"{pp}.video_url"
    if not isinstance(spec, dict):
        raise bad(f"{where} must be an object with a url", where)
    refuse_unknown(spec, {"url", *VIDEO_OPTIONS}, where)
    return video_content(spec.get("url"), video_options(spec, where), pp, allow_urls, url_param=f"{where}.url",
                         options_param=where)


def _messages(msgs: Any, allow_urls: bool) -> list[Message]:
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    messages = []
    for param, m in each_object(msgs, "messages"):
        refuse_unknown(m, MESSAGE_KEYS, param)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{param}.role must be one of {sorted(ROLES)}, got {role!r}", f"{param}.role")
        calls = _history_calls(m, role, param)
        content = m.get("content")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
                raise bad(f"{param}.tool_call_id must be the id of the call this is the result of",
                          f"{param}.tool_call_id")
            parts = _parts(content, role, f"{param}.content", allow_urls)
            if any(p.kind != "text" for p in parts):
                raise bad(f"{param}.content: a tool result can only hold text", f"{param}.content")
        else:
            if m.get("tool_call_id") is not None:
                raise bad(f"{param}.tool_call_id is only for role 'tool' messages", f"{param}.tool_call_id")
            parts = [] if content is None and calls else _parts(content, role, f"{param}.content", allow_urls)
        messages.append(Message(role, parts, param, tool_calls=calls, tool_call_id=m.get("tool_call_id")))
    check_tool_history(messages)
    return messages


def _history_calls(m: dict, role: str, param: str) -> list[T.ToolCall]:
    """An assistant message's ``tool_calls`` (arguments must be a JSON object's text)."""
    raw = m.get("tool_calls")
    if raw is None:
        return []
    if role != "assistant":
        raise bad(f"{param}.tool_calls is only for assistant messages", f"{param}.tool_calls")
    calls = []
    for cp, c in each_object(raw, f"{param}.tool_calls"):
        refuse_unknown(c, frozenset({"id", "type", "function"}), cp)
        if c.get("type", "function") != "function":
            raise bad(f"{cp}.type must be 'function'", f"{cp}.type")
        fn = c.get("function")
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise bad(f"{cp}.id must be a non-empty string", f"{cp}.id")
        if not isinstance(fn, dict):
            raise bad(f"{cp}.function must be an object with name and arguments", f"{cp}.function")
        refuse_unknown(fn, frozenset({"name", "arguments"}), f"{cp}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{cp}.function.name must be a non-empty string", f"{cp}.function.name")
        args = fn.get("arguments", "{}")
        try:
            ok = isinstance(args, str) and isinstance(json.loads(args), dict)
        except (json.JSONDecodeError, RecursionError):
            ok = False
        if not ok:
            raise bad(f"{cp}.function.arguments must be a JSON object, as text", f"{cp}.function.arguments")
        calls.append(T.ToolCall(c["id"], valid_text(fn["name"], f"{cp}.function.name"),
                                valid_text(args, f"{cp}.function.arguments")))
    return calls


def _tools(body: dict) -> tuple[list[T.Tool], bool]:
    """``tools`` (type ``function``) -> typed tools, and whether any asked for ``strict``."""
    raw = body.get("tools")
    if raw is None:
        return [], False
    tools, strict = [], False
    for param, t in each_object(raw, "tools"):
        refuse_unknown(t, frozenset({"type", "function"}), param)
        if t.get("type") != "function":
            raise bad(f"{param}.type must be 'function' (the only kind of tool this server runs)", f"{param}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad(f"{param}.function must be an object", f"{param}.function")
        refuse_unknown(fn, frozenset({"name", "description", "parameters", "strict"}), f"{param}.function")
        name, desc = fn.get("name"), fn.get("description", "")
        if not isinstance(name, str):
            raise bad(f"{param}.function.name must be a string", f"{param}.function.name")
        if not isinstance(desc, str):
            raise bad(f"{param}.function.description must be a string", f"{param}.function.description")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise bad(f"{param}.function.strict must be a boolean", f"{param}.function.strict")
        strict = strict or bool(fn.get("strict"))
        tools.append(T.Tool(name, desc, fn.get("parameters")))
    check_tools(tools)
    return tools, strict


def _tool_choice(body: dict) -> tuple[str, str | None]:
    tc = body.get("tool_choice")
    if tc is None:
        return ("auto" if body.get("tools") else "none"), None
    if isinstance(tc, str):
        return tc, None
    if isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("function"), dict):
        refuse_unknown(tc, frozenset({"type", "function"}), "tool_choice")
        refuse_unknown(tc["function"], frozenset({"name"}), "tool_choice.function")
        return "function", tc["function"].get("name")
    raise bad("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
              "{\"name\": ...}}", "tool_choice")


def _flag(body: dict, name: str, default: Any = False) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be a boolean", name)
    return v


def _string(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad(f"{name} must be a string", name)
    return v


def _template_kwargs(body: dict) -> dict[str, Any]:
    ctk = body.get("chat_template_kwargs") or {}
    if not isinstance(ctk, dict):
        raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    for k, v in ctk.items():
        if k in RESERVED_TEMPLATE_KWARGS or k.startswith("_"):
            raise bad(f"chat_template_kwargs.{k} cannot be set by a request", f"chat_template_kwargs.{k}")
        if not isinstance(v, (bool, int, float, str)) or v is None:
            raise bad(f"chat_template_kwargs.{k} must be a boolean, number or string", f"chat_template_kwargs.{k}")
    return dict(ctk)


# Every body key this server honours; any other is refused by name (nothing is silently ignored).
KNOWN_KEYS = frozenset({"model", "messages", "stream", "stream_options", "n", "user", "chat_template_kwargs",
                        "return_token_ids", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                        "store", "metadata", "reasoning_effort", "service_tier", "prompt_cache_key",
                        "safety_identifier",
                        *(k for f in F.CHAT_FIELDS for k in (f.name, *f.aliases))})
MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id"})


def _response_format(body: dict) -> T.Constraint | None:
    """OpenAI's ``response_format``: ``text`` (none), ``json_object``, ``json_schema`` (``strict`` or
    not, it is enforced: the decoder masks every token to the schema)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad("response_format must be an object", "response_format")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return T.Constraint("json_object")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise bad("response_format.json_schema must be an object with a schema object",
                      "response_format.json_schema")
        if "strict" in spec and not isinstance(spec["strict"], bool | None):
            raise bad("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
        return T.Constraint("json_schema", json.dumps(spec.get("schema", {})))
    raise bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
              "response_format.type")


def parse_chat_request(body: Any, *, allow_urls: bool = False) -> ChatRequest:
    """Validate an OpenAI chat-completions body into the typed request."""
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", None)
    refuse_unknown(body, KNOWN_KEYS, "")
    messages = _messages(body.get("messages"), allow_urls)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise bad("n must be an integer", "n")
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    stream = _flag(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    sampling, options = parse_fields(body)
    sampling.constraint = _response_format(body)
    model = _string(body, "model")
    _string(body, "user")
    _string(body, "safety_identifier")  # logged with the request (gateway.fronts.openai_chat.routes)
    tools, strict = _tools(body)
    choice, name = _tool_choice(body)
    kwargs = _template_kwargs(body)
    apply_effort(reasoning_effort(body.get("reasoning_effort"), "reasoning_effort"), kwargs, sampling,
                 "reasoning_effort")
    req = ChatRequest(model=model, messages=messages, stream=stream,
                      include_usage=bool(opts.get("include_usage", False)),
                      return_token_ids=_flag(body, "return_token_ids"), sampling=sampling,
                      include_reasoning=options.get("include_reasoning"),
                      chat_template_kwargs=kwargs, tools=tools, tool_choice=choice, tool_name=name,
                      parallel_tool_calls=_flag(body, "parallel_tool_calls", True), strict_tools=strict,
                      store=_flag(body, "store"), **openai_routing(body))
    check_tool_choice(req)
    return req


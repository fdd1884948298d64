"""The typed gRPC chat API's protobuf mapping: ``mmserve.chat.v1`` messages ↔ the gateway's types.

Why here, not in the shared core: only this front reads a ``ChatRequest`` message or writes a
``Delta`` / ``Final`` one (the core keeps the enum maps the public client shares).  The request is
parsed straight into ``ChatRequest`` — the fields through the one table and its checks, media through
the same rules as the HTTP fronts, no JSON detour.  Pure Python; the gateway's event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from gateway import request as chat
from gateway.video_parts import video_options
from mmserve_core.wire import codec, fields
from mmserve_core.wire import types as T
from mmserve_core.wire.stubs import chat_pb2

FINISH_TO_PB = {"stop": chat_pb2.FINISH_REASON_STOP, "length": chat_pb2.FINISH_REASON_LENGTH,
                "tool_calls": chat_pb2.FINISH_REASON_TOOL_CALLS}


# ----------------------------------------------------------------------------- request
def params_to_values(params: chat_pb2.ChatParams) -> dict:
    """The typed API's params as ``{field name: value}`` for the fields table's validator: every
    field the caller set (``optional`` ones by presence, lists and flags when non-empty)."""
    values: dict = {}
    for f in fields.CHAT_FIELDS:
        if params.DESCRIPTOR.fields_by_name[f.proto].has_presence:
            if params.HasField(f.proto):
                values[f.name] = getattr(params, f.proto)
        elif f.kind == "bias":
            if getattr(params, f.proto):
                values[f.name] = {int(k): float(v) for k, v in getattr(params, f.proto).items()}
        elif getattr(params, f.proto):
            value = getattr(params, f.proto)
            values[f.name] = list(value) if f.kind == "stop" else value
    return values


def _part(p: chat_pb2.Part, role: str, pp: str) -> chat.Part:
    kind = p.WhichOneof("kind")
    if kind == "text":
        return chat.Part("text", pp, text=p.text)
    if kind == "image":
        chat.media_role(role, "image", pp)
        if not p.image.data:
            raise chat.bad(f"{pp}.image.data must not be empty", f"{pp}.image.data")
        return chat.image_part(bytes(p.image.data), p.image.mime_type, codec.DETAIL_FROM_PB[p.image.detail], pp,
                          detail_param=f"{pp}.detail")
    if kind == "audio":
        chat.media_role(role, "audio", pp)
        return chat.audio_part(bytes(p.audio.data), p.audio.format or None, pp)
    if kind == "video":
        chat.media_role(role, "video", pp)
        return _video(p.video, f"{pp}.video")
    raise chat.bad(f"{pp}: a part must be text, image, audio or video", pp)


_TRACK = {chat_pb2.VIDEO_AUDIO_TRACK_UNSPECIFIED: True, chat_pb2.VIDEO_AUDIO_TRACK_INCLUDE: True,
          chat_pb2.VIDEO_AUDIO_TRACK_OFF: False}


def _video(v: chat_pb2.VideoPart, where: str) -> chat.Part:
    if not v.data:
        raise chat.bad(f"{where}.data must not be empty", f"{where}.data")
    if v.audio_track not in _TRACK:
        raise chat.bad(f"{where}.audio_track: {v.audio_track} is not a VideoAudioTrack value", f"{where}.audio_track")
    options = video_options({"fps": v.fps or None, "max_frames": v.max_frames or None,
                                  "audio_track": _TRACK[v.audio_track]}, where)
    return chat.Part("video", where[: -len(".video")], media=T.MediaInput(T.VIDEO, bytes(v.data), "", video=options),
                     options_param=where)


def _json_object(text: str, param: str, *, empty_ok: bool) -> dict | None:
    if not text and empty_ok:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise chat.bad(f"{param} must be a JSON object, as text", param)
    return value


def _message(m: chat_pb2.Message, i: int) -> chat.Message:
    param = f"messages[{i}]"
    role = codec.ROLE_FROM_PB.get(m.role)
    if role is None:
        raise chat.bad(f"{param}.role must be set (ROLE_SYSTEM, ROLE_DEVELOPER, ROLE_USER, ROLE_ASSISTANT or "
                       "ROLE_TOOL)", f"{param}.role")
    parts = [_part(p, role, f"{param}.content[{j}]") for j, p in enumerate(m.parts)]
    if m.tool_calls and role != "assistant":
        raise chat.bad(f"{param}.tool_calls is only for ROLE_ASSISTANT messages", f"{param}.tool_calls")
    if (role == "tool") != bool(m.tool_call_id):
        raise chat.bad(f"{param}.tool_call_id is required on ROLE_TOOL messages and only there", f"{param}.tool_call_id")
    if role == "tool" and any(p.kind != "text" for p in parts):
        raise chat.bad(f"{param}: a tool result can only hold text", f"{param}.parts")
    calls = []
    for j, c in enumerate(m.tool_calls):
        cp = f"{param}.tool_calls[{j}]"
        if not c.id or not c.name:
            raise chat.bad(f"{cp} needs an id and a name", cp)
        _json_object(c.arguments_json or "{}", f"{cp}.arguments_json", empty_ok=False)
        calls.append(T.ToolCall(c.id, c.name, c.arguments_json or "{}"))
    return chat.Message(role, parts, param, tool_calls=calls, tool_call_id=m.tool_call_id or None)


def parse_chat_pb(pb: chat_pb2.ChatRequest) -> chat.ChatRequest:
    """The typed API's request as the gateway's ``ChatRequest`` (enum values were checked when
    the bytes were parsed)."""
    if not pb.messages:
        raise chat.bad("messages must be a non-empty list", "messages")
    messages = [_message(m, i) for i, m in enumerate(pb.messages)]
    chat.check_tool_history(messages)
    sampling, options = chat.parse_fields(params_to_values(pb.params))
    if pb.params.HasField("constraint"):
        sampling.constraint = codec.constraint_from_pb(pb.params.constraint, "params.constraint")
    kwargs = {"enable_thinking": pb.params.enable_thinking} if pb.params.HasField("enable_thinking") else {}
    tools = [T.Tool(t.name, t.description, _json_object(t.parameters_json, f"tools[{i}].parameters_json",
                                                        empty_ok=True)) for i, t in enumerate(pb.tools)]
    chat.check_tools(tools)
    mode = pb.tool_choice.mode
    choice = codec.TOOL_CHOICE_FROM_PB.get(mode, "auto" if tools else "none")
    if pb.tool_choice.function_name and choice != "function":
        raise chat.bad("tool_choice.function_name is only for TOOL_CHOICE_MODE_FUNCTION", "tool_choice.function_name")
    req = chat.ChatRequest(model=pb.model or None, messages=messages, return_token_ids=pb.return_prompt_token_ids,
                           sampling=sampling, include_reasoning=options.get("include_reasoning"),
                           chat_template_kwargs=kwargs, tools=tools, tool_choice=choice,
                           tool_name=pb.tool_choice.function_name or None,
                           parallel_tool_calls=pb.parallel_tool_calls if pb.HasField("parallel_tool_calls") else True,
                           strict_tools=any(t.strict for t in pb.tools))
    chat.check_tool_choice(req)
    return req



# ----------------------------------------------------------------------------- reply
def delta_to_pb(content: str, reasoning: str, token_ids: list[int], logprobs: Sequence[T.TokenLogprob],
                token_text: Callable[[int], str], tool_calls: Sequence[T.ToolCallDelta] = ()) -> chat_pb2.Delta:
    """One event's text, ids, typed logprobs (their token texts from ``token_text``) and call pieces."""
    return chat_pb2.Delta(
        content=content, reasoning_content=reasoning, token_ids=token_ids,
        tool_calls=[chat_pb2.ToolCallDelta(index=d.index, id=d.id or "", name=d.name or "", arguments=d.arguments)
                    for d in tool_calls],
        logprobs=[chat_pb2.TokenLogprob(
            token_id=e.token_id, token=token_text(e.token_id), logprob=e.logprob,
            top=[chat_pb2.TopLogprob(token_id=t, token=token_text(t), logprob=v) for t, v in e.top])
            for e in logprobs],
    )


def final_to_pb(cid: str, model: str, c: T.Completion, encode_ms: float, prompt_ids: list[int] | None,
                finish_reason: str = "", tool_calls: Sequence[T.ToolCall] = ()) -> chat_pb2.Final:
    return chat_pb2.Final(
        id=cid, model=model,
        finish_reason=FINISH_TO_PB[finish_reason or c.finish_reason],
        tool_calls=[codec.tool_call_to_pb(t) for t in tool_calls],
        usage=chat_pb2.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                             soft_tokens=c.soft_tokens, cached_tokens=c.cached_tokens,
                             draft_tokens=c.draft_tokens, draft_accepted_tokens=c.draft_accepted_tokens),
        timings=chat_pb2.Timings(encode_ms=encode_ms, queued_ms=c.queued_ms, prefill_ms=c.prefill_ms,
                                 decode_ms=c.decode_ms),
        prompt_token_ids=prompt_ids or [],
    )

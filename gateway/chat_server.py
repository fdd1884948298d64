"""The typed gRPC chat front (``mmserve.chat.v1.ChatService``), next to the HTTP app.

Why: services inside a network should send raw media bytes and typed
fields, not base64 JSON, and should not have to know the chat template or
talk to two services.  A front like the OpenAI one: the protobuf request is
parsed straight into the gateway's typed ``ChatRequest`` (the fields through
the same table and checks, media through the same rules — no JSON detour),
``Pipeline.start`` runs it, and its typed events become ``CompleteResponse``
messages; errors go through the same ``HTTPError`` and ``errors.grpc_status``.
The request id comes from ``x-request-id`` metadata (or is made) and is
returned in trailing metadata.  Transport: runs on the gateway's event loop.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from gateway import chat
from gateway.config import GatewayConfig
from gateway.errors import HTTPError, grpc_status, to_http
from gateway.pipeline import Pipeline
from gateway.reply import fold, no_done
from mmserve_core.runtime.grpc_runtime import add_servicer, create_server, request_id_from, set_serving
from mmserve_core.runtime.logs import REQUEST_ID_HEADER, get_logger, request_id_var
from mmserve_core.wire import codec
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import ServeError
from mmserve_core.wire.stubs import chat_pb2, chat_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


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
    raise chat.bad(f"{pp}: a part must be text, image or audio", pp)


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
    sampling, options = chat.parse_fields(codec.chat_params_to_values(pb.params))
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


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, pipeline: Pipeline, cfg: GatewayConfig) -> None:
        self.pipeline = pipeline
        self.cfg = cfg

    def _final(self, pb: chat_pb2.ChatRequest, cid: str, done: chat.Done) -> chat_pb2.Final:
        c = done.completion
        log.info("completed", front="grpc", finish_reason=done.finish_reason, prompt_tokens=c.prompt_tokens,
                 completion_tokens=c.completion_tokens)
        return codec.chat_final_to_pb(cid, self.pipeline.model_id, c, done.encode_ms,
                                      done.prompt_ids if pb.return_prompt_token_ids else None, done.finish_reason,
                                      done.tool_calls)

    async def _fail(self, context, e: Exception, started: bool) -> None:
        """Every failure as its status code (the one HTTP ↔ gRPC table); a traceback only for a bug."""
        err = to_http(e, upstream="decoder" if started else "gateway")
        if err.status >= 500 and not isinstance(e, HTTPError | ServeError):
            log.exception("chat rpc failed")
        await context.abort(grpc_status(err), err.message)

    async def Complete(self, request: chat_pb2.CompleteRequest, context) -> AsyncIterator[chat_pb2.CompleteResponse]:
        rid = request_id_from(context)
        token = request_id_var.set(rid)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        pb, gen = request.chat, None
        try:
            req = parse_chat_pb(pb)
            gen = await self.pipeline.start(req, rid)
            keep = self.pipeline.keep_reasoning(req)
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            async for ev in gen.events():
                if isinstance(ev, chat.Done):
                    yield chat_pb2.CompleteResponse(final=self._final(pb, cid, ev))
                    return
                lps = self.pipeline.logprobs.content(ev.logprobs) if req.sampling.logprobs else []
                yield chat_pb2.CompleteResponse(delta=codec.chat_delta_to_pb(
                    ev.content, ev.reasoning if keep else "", ev.token_ids, lps, ev.tool_calls))
            raise no_done()
        except Exception as e:  # noqa: BLE001 - one mapping for every failure
            await self._fail(context, e, gen is not None)
        finally:
            if gen is not None:
                gen.cancel()
            request_id_var.reset(token)

    async def CompleteUnary(self, request: chat_pb2.CompleteUnaryRequest, context) -> chat_pb2.CompleteUnaryResponse:
        """The whole reply from one fold of the events (the calls are whole in ``final.tool_calls``)."""
        rid = request_id_from(context)
        token = request_id_var.set(rid)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        pb, gen = request.chat, None
        try:
            req = parse_chat_pb(pb)
            gen = await self.pipeline.start(req, rid)
            got = await fold(gen, lambda: _gone(context))
            lps = self.pipeline.logprobs.content(got.logprobs) if req.sampling.logprobs else []
            message = codec.chat_delta_to_pb(got.text, got.thought if self.pipeline.keep_reasoning(req) else "",
                                             got.token_ids, lps, ())
            return chat_pb2.CompleteUnaryResponse(message=message,
                                                  final=self._final(pb, f"chatcmpl-{uuid.uuid4().hex}", got.done))
        except Exception as e:  # noqa: BLE001 - one mapping for every failure
            await self._fail(context, e, gen is not None)
        finally:
            request_id_var.reset(token)


async def _gone(context) -> bool:
    return context.done() or context.cancelled()


async def start_chat_server(pipeline: Pipeline, cfg: GatewayConfig):
    """Bind ``cfg.grpc_host:cfg.grpc_port`` (0 = any free port); returns ``(server, port)``."""
    address = f"[{cfg.grpc_host}]:{cfg.grpc_port}" if ":" in cfg.grpc_host else f"{cfg.grpc_host}:{cfg.grpc_port}"
    server, port, health = await create_server(address, [SERVICE_NAME], tls=cfg.tls)
    add_servicer(server, ChatServicer(pipeline, cfg), chat_pb2.DESCRIPTOR.services_by_name["ChatService"])
    await server.start()
    await set_serving(health, [SERVICE_NAME], True)
    log.info("chat gRPC listening", address=address, port=port)
    return server, port

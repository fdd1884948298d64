"""The typed gRPC chat front's servicer (``mmserve.chat.v1.ChatService``), next to the HTTP app.

Why: services inside a network should send raw media bytes and typed
fields, not base64 JSON, and should not have to know the chat template or
talk to two services.  A front like the OpenAI one: the protobuf request is
parsed straight into the gateway's typed ``ChatRequest`` by ``codec`` (the fields through
the same table and checks, media through the same rules — no JSON detour),
``Pipeline.start`` runs it, and its typed events become ``CompleteResponse``
messages; errors go through the same ``HTTPError`` and ``errors.grpc_status``.
The request id comes from ``x-request-id`` metadata (or is made) and is
returned in trailing metadata.  Transport: runs on the gateway's event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from gateway.config import GatewayConfig
from gateway.errors import HTTPError, grpc_status, to_http
from gateway.events import Done
from gateway.fronts.grpc_chat.codec import delta_to_pb, final_to_pb, parse_chat_pb
from gateway.pipeline import Pipeline
from gateway.reply import fold, no_done
from mmserve_core.runtime.grpc_runtime import add_servicer, create_server, request_id_from, set_serving
from mmserve_core.runtime.logs import REQUEST_ID_HEADER, get_logger, request_id_var
from mmserve_core.wire.errors import ServeError
from mmserve_core.wire.stubs import chat_pb2, chat_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@contextmanager
def _request_id(context) -> Iterator[str]:
    """The call's request id (``x-request-id`` metadata, or a new one): on every log line while the
    call runs (``request_id_var``) and returned in the trailing metadata."""
    rid = request_id_from(context)
    token = request_id_var.set(rid)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
    try:
        yield rid
    finally:
        request_id_var.reset(token)


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, pipeline: Pipeline, cfg: GatewayConfig) -> None:
        self.pipeline = pipeline
        self.cfg = cfg

    def _final(self, pb: chat_pb2.ChatRequest, cid: str, done: Done) -> chat_pb2.Final:
        c = done.completion
        log.info("completed", front="grpc", finish_reason=done.finish_reason, prompt_tokens=c.prompt_tokens,
                 completion_tokens=c.completion_tokens)
        return final_to_pb(cid, self.pipeline.model_id, c, done.encode_ms,
                                      done.prompt_ids if pb.return_prompt_token_ids else None, done.finish_reason,
                                      done.tool_calls)

    async def _fail(self, context, e: Exception, started: bool) -> None:
        """Every failure as its status code (the one HTTP ↔ gRPC table); a traceback only for a bug."""
        err = to_http(e, upstream="decoder" if started else "gateway")
        if err.status >= 500 and not isinstance(e, HTTPError | ServeError):
            log.exception("chat rpc failed")
        await context.abort(grpc_status(err), err.message)

    async def Complete(self, request: chat_pb2.CompleteRequest, context) -> AsyncIterator[chat_pb2.CompleteResponse]:
        with _request_id(context) as rid:
            async for out in self._complete(request.chat, rid, context):
                yield out

    async def _complete(self, pb: chat_pb2.ChatRequest, rid: str, context) -> AsyncIterator[chat_pb2.CompleteResponse]:
        gen = None
        try:
            req = parse_chat_pb(pb)
            gen = await self.pipeline.start(req, rid)
            keep = self.pipeline.keep_reasoning(req)
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            async for ev in gen.events():
                if isinstance(ev, Done):
                    yield chat_pb2.CompleteResponse(final=self._final(pb, cid, ev))
                    return
                lps = ev.logprobs if req.sampling.logprobs else []
                yield chat_pb2.CompleteResponse(delta=delta_to_pb(
                    ev.content, ev.reasoning if keep else "", ev.token_ids, lps, self.pipeline.logprobs.text,
                    ev.tool_calls))
            raise no_done()
        except Exception as e:  # noqa: BLE001 - one mapping for every failure
            await self._fail(context, e, gen is not None)
        finally:
            if gen is not None:
                gen.cancel()

    async def CompleteUnary(self, request: chat_pb2.CompleteUnaryRequest, context) -> chat_pb2.CompleteUnaryResponse:
        """The whole reply from one fold of the events (the calls are whole in ``final.tool_calls``)."""
        with _request_id(context) as rid:
            return await self._complete_unary(request.chat, rid, context)

    async def _complete_unary(self, pb: chat_pb2.ChatRequest, rid: str, context) -> chat_pb2.CompleteUnaryResponse:
        gen = None
        try:
            req = parse_chat_pb(pb)
            gen = await self.pipeline.start(req, rid)
            got = await fold(gen, lambda: _gone(context))
            lps = got.logprobs if req.sampling.logprobs else []
            message = delta_to_pb(got.text, got.thought if self.pipeline.keep_reasoning(req) else "",
                                  got.token_ids, lps, self.pipeline.logprobs.text)
            return chat_pb2.CompleteUnaryResponse(message=message,
                                                  final=self._final(pb, f"chatcmpl-{uuid.uuid4().hex}", got.done))
        except Exception as e:  # noqa: BLE001 - one mapping for every failure
            await self._fail(context, e, gen is not None)


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

"""The typed gRPC chat front (``mmserve.chat.v1.ChatService``), next to the HTTP app.

Why: services inside a network should send raw media bytes and typed
fields, not base64 JSON, and should not have to know the chat template or
talk to two services.  This is transport only: the request becomes the same
validated ``ChatRequest`` the HTTP front builds (same checks, same
messages), goes through the same ``Pipeline``, and errors are mapped from
the same ``HTTPError`` back to gRPC codes in ``errors.grpc_status``.  The
request id comes from ``x-request-id`` metadata (or is made) and is returned
in trailing metadata.  Runs on the gateway's event loop, beside uvicorn.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from gateway.config import GatewayConfig
from gateway.errors import grpc_status, to_http
from gateway.openai_schema import parse_chat_request
from gateway.pipeline import Pipeline
from gateway.reasoning import ReasoningParser
from mmserve_core.runtime.grpc_runtime import add_servicer, create_server, request_id_from, set_serving
from mmserve_core.runtime.logs import REQUEST_ID_HEADER, get_logger, request_id_var
from mmserve_core.wire import codec
from mmserve_core.wire.stubs import chat_pb2, chat_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, pipeline: Pipeline, cfg: GatewayConfig) -> None:
        self.pipeline = pipeline
        self.cfg = cfg

    async def _events(self, chat: chat_pb2.ChatRequest, context) -> AsyncIterator[chat_pb2.CompleteResponse]:
        rid = request_id_from(context)
        token = request_id_var.set(rid)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        call = None
        try:
            req = parse_chat_request(codec.chat_request_to_body(chat), internal=True,
                                     allow_urls=False)
            ids, spans, encode_ms = await self.pipeline.prepare(req, rid)
            call, first = await self.pipeline.start_generate(ids, spans, req.sampling, rid)
            keep = req.include_reasoning if req.include_reasoning is not None else self.cfg.reasoning == "separate"
            parser = ReasoningParser()
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            msg = first
            while msg is not grpc.aio.EOF:
                if msg.WhichOneof("payload") == "token":
                    content, reasoning = parser.feed(msg.token.text)
                    lps = (self.pipeline.logprobs.content(codec.token_logprobs_from_pb(msg.token))
                           if req.sampling.logprobs else [])
                    yield chat_pb2.CompleteResponse(delta=codec.chat_delta_to_pb(
                        content, reasoning if keep else "", list(msg.token.token_ids), lps))
                else:
                    c = codec.completion_from_pb(msg.complete)
                    log.info("completed", front="grpc", finish_reason=c.finish_reason,
                             prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                    yield chat_pb2.CompleteResponse(final=codec.chat_final_to_pb(
                        cid, self.pipeline.model_id, c, encode_ms, ids if chat.return_prompt_token_ids else None))
                msg = await call.read()
        except Exception as e:  # noqa: BLE001 - one mapping for every failure
            err = to_http(e, upstream="decoder" if call is not None else "gateway")
            if err.status >= 500 and not isinstance(e, grpc.aio.AioRpcError):
                log.exception("chat rpc failed")
            await context.abort(grpc_status(err), err.message)
        finally:
            if call is not None:
                call.cancel()
            request_id_var.reset(token)

    async def Complete(self, request: chat_pb2.CompleteRequest, context) -> AsyncIterator[chat_pb2.CompleteResponse]:
        async for ev in self._events(request.chat, context):
            yield ev

    async def CompleteUnary(self, request: chat_pb2.CompleteUnaryRequest, context) -> chat_pb2.CompleteUnaryResponse:
        whole = chat_pb2.Delta()
        final = None
        async for ev in self._events(request.chat, context):
            if ev.WhichOneof("payload") == "delta":
                whole.content += ev.delta.content
                whole.reasoning_content += ev.delta.reasoning_content
                whole.token_ids.extend(ev.delta.token_ids)
                whole.logprobs.extend(ev.delta.logprobs)
            else:
                final = ev.final
        return chat_pb2.CompleteUnaryResponse(message=whole, final=final)


async def start_chat_server(pipeline: Pipeline, cfg: GatewayConfig):
    """Bind ``cfg.grpc_host:cfg.grpc_port`` (0 = any free port); returns ``(server, port)``."""
    address = f"[{cfg.grpc_host}]:{cfg.grpc_port}" if ":" in cfg.grpc_host else f"{cfg.grpc_host}:{cfg.grpc_port}"
    server, port, health = await create_server(address, [SERVICE_NAME], tls=cfg.tls)
    add_servicer(server, ChatServicer(pipeline, cfg), chat_pb2.DESCRIPTOR.services_by_name["ChatService"])
    await server.start()
    await set_serving(health, [SERVICE_NAME], True)
    log.info("chat gRPC listening", address=address, port=port)
    return server, port

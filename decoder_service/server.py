"""gRPC transport for the decoder: reads the setup + chunk stream, streams tokens back.

Why: transport only — no MLX.  ``Generate`` validates the setup message
before accepting any embedding bytes (a bad span fails fast), reassembles
each span's chunks with offset and size checks, then iterates the engine's
events.  If the caller cancels or its deadline passes, leaving the ``async
for`` closes the engine iterator, which flags the MLX thread to stop.
Runs on the asyncio event-loop thread.
"""

from __future__ import annotations

import grpc

from decoder_service.engine import DecoderEngine
from mmserve_common import codec
from mmserve_common import types as T
from mmserve_common.errors import InvalidArgument
from mmserve_common.grpc_runtime import create_server, rpc_scope
from mmserve_common.logs import get_logger
from mmserve_common.stubs import decoder_pb2, decoder_pb2_grpc
from mmserve_common.tensors import Assembler
from mmserve_common.tls import ServerTLS

log = get_logger(__name__)
SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, engine: DecoderEngine) -> None:
        self.engine = engine

    async def Generate(self, request_iterator, context: grpc.aio.ServicerContext):
        m = self.engine.metrics
        async with rpc_scope(context, "Generate", on_outcome=lambda o: m.requests.labels(o).inc()):
            it = request_iterator.__aiter__()
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                raise InvalidArgument("Generate stream closed before the setup message") from None
            if first.WhichOneof("payload") != "setup":
                raise InvalidArgument("the first Generate message must be a setup, got an embedding chunk")
            setup = first.setup
            ids = [int(x) for x in setup.prompt_token_ids]
            declared = [codec.span_from_pb(i, s) for i, s in enumerate(setup.spans)]
            sampling = codec.sampling_from_pb(setup.sampling)
            resolved = self.engine.validate(ids, declared, sampling)
            assemblers = [
                Assembler(f"spans[{i}]", dtype, shape) for i, (_, dtype, shape) in enumerate(declared)
            ]
            pending = sum(1 for a in assemblers if not a.complete)
            while pending:
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:
                    missing = [i for i, a in enumerate(assemblers) if not a.complete]
                    raise InvalidArgument(
                        f"Generate stream ended before the embeddings of spans {missing} were complete"
                    ) from None
                if msg.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only embedding chunks may follow the setup message")
                c = msg.chunk
                if c.span_index >= len(assemblers):
                    raise InvalidArgument(
                        f"chunk for span_index {c.span_index}, but only {len(assemblers)} spans were declared"
                    )
                a = assemblers[c.span_index]
                if a.complete:
                    raise InvalidArgument(f"spans[{c.span_index}]: received more bytes than declared")
                a.add(c.byte_offset, c.data)
                if a.complete:
                    pending -= 1
            try:  # the caller must close its side now: anything more is a protocol error
                extra = await it.__anext__()
            except StopAsyncIteration:
                extra = None
            if extra is not None:
                what = "embedding bytes beyond the declared spans" if extra.WhichOneof("payload") == "chunk" \
                    else "a second setup message"
                raise InvalidArgument(f"received {what}; send the setup, every span's chunks, then close the stream")
            spans = [
                T.SpanEmbedding(span, a.finish()) for (span, _, _), a in zip(declared, assemblers)
            ]
            events = self.engine.generate(ids, spans, resolved, sampling.stop_token_ids)
            try:
                async for ev in events:
                    if isinstance(ev, T.TokenEvent):
                        yield codec.token_event_to_pb(ev)
                    else:
                        log.info("generated", finish_reason=ev.finish_reason, prompt_tokens=ev.prompt_tokens,
                                 soft_tokens=ev.soft_tokens, completion_tokens=ev.completion_tokens,
                                 prefill_ms=round(ev.prefill_ms, 2), decode_ms=round(ev.decode_ms, 2))
                        yield codec.completion_to_pb(ev)
            finally:
                await events.aclose()

    async def GetModelInfo(self, request, context):
        async with rpc_scope(context, "GetModelInfo"):
            info = self.engine.info
            mods = []
            for name, ids in ((T.IMAGE, info.image), (T.AUDIO, info.audio)):
                if ids is not None and name in self.engine.placeholder_ids:
                    mods.append(
                        decoder_pb2.ModalityTokens(
                            modality=codec.MODALITY_TO_PB[name],
                            placeholder_token_id=ids.placeholder,
                            begin_token_id=ids.begin,
                            end_token_id=ids.end,
                        )
                    )
            return decoder_pb2.GetModelInfoResponse(
                model_id=info.model_id,
                dtype=codec.DTYPE_TO_PB.get(self.engine.dtype or "", 0),
                hidden_size=info.hidden_size,
                context_length=self.engine.context_length,
                eos_token_ids=self.engine.eos_ids,
                modalities=mods,
                vocab_size=info.vocab_size,
                bidirectional_vision=info.bidirectional_vision,
                per_layer_inputs=info.per_layer_inputs,
                chat_template=self.engine.chat_template,
            )


async def start_decoder_server(engine: DecoderEngine, address: str, tls: ServerTLS | None = None):
    server, port, health = await create_server(address, [SERVICE_NAME], tls=tls)
    decoder_pb2_grpc.add_DecoderServiceServicer_to_server(DecoderServicer(engine), server)
    await server.start()
    return server, port, health

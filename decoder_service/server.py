"""gRPC transport for the decoder: reads the setup + chunk stream, streams tokens back.

Why: transport only — no MLX.  ``Generate`` reads its request stream
through ``intake`` (stream limits, idle timeout, setup checked before any
embedding bytes are accepted, chunks reassembled with offset and size
checks), then iterates the engine's events.  If the caller cancels or its deadline passes, leaving the ``async
for`` closes the engine iterator, which flags the MLX thread to stop.
Runs on the asyncio event-loop thread.
"""

from __future__ import annotations

import grpc

from decoder_service.engine import DecoderEngine
from decoder_service.intake import StreamAdmission, StreamReader, read_generate
from mmserve_core.digests import CONTRACT_VERSION
from mmserve_core.runtime.grpc_runtime import add_servicer, create_server, rpc_scope
from mmserve_core.runtime.logs import get_logger
from mmserve_core.runtime.tls import ServerTLS
from mmserve_core.wire import codec
from mmserve_core.wire import types as T
from mmserve_core.wire.stubs import decoder_pb2, decoder_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, engine: DecoderEngine) -> None:
        self.engine = engine
        self.admission = StreamAdmission(engine.stream_limits, engine.metrics)
        engine.metrics.bind_admission(self.admission)

    async def Generate(self, request_iterator, context: grpc.aio.ServicerContext):
        m = self.engine.metrics
        async with rpc_scope(context, "Generate", on_outcome=lambda o: m.requests.labels(o).inc()):
            with self.admission.open() as ticket:
                reader = StreamReader(codec.typed_generate_requests(request_iterator), self.admission.limits, m)
                inp = await read_generate(reader, self.engine, self.admission, ticket, context)
                self.admission.release(ticket)  # the rows now belong to the engine's job (bounded by its queue)
                events = self.engine.generate(inp.ids, inp.spans, inp.resolved, inp.stop_token_ids,
                                              priority=inp.priority, cache_point=inp.cache_point)
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
            for name, ids in ((T.IMAGE, info.image), (T.AUDIO, info.audio), (T.VIDEO, info.video)):
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
                capabilities=sorted(self.engine.capabilities),
                contract_version=CONTRACT_VERSION,
                tokenizer_digest=self.engine.tokenizer_digest,
                chat_template_digest=self.engine.template_digest,
            )


async def start_decoder_server(engine: DecoderEngine, address: str, tls: ServerTLS | None = None):
    server, port, health = await create_server(address, [SERVICE_NAME], tls=tls)
    add_servicer(server, DecoderServicer(engine), decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"])
    await server.start()
    return server, port, health

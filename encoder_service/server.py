"""gRPC transport for the encoder: converts wire messages, awaits the engine.

Why: transport only — no MLX here.  Each handler binds the request id, hands
the request to ``EncoderEngine`` and streams the result as header + chunks per
item, so no message ever approaches gRPC's size limit.  Runs on the asyncio
event-loop thread.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from encoder_service.engine import EncoderEngine
from mmserve_core.runtime.grpc_runtime import add_servicer, create_server, rpc_scope
from mmserve_core.runtime.logs import get_logger
from mmserve_core.runtime.tls import ServerTLS
from mmserve_core.wire import codec
from mmserve_core.wire.chunk_frames import write_chunk
from mmserve_core.wire.errors import InvalidArgument
from mmserve_core.wire.stubs import encoder_pb2, encoder_pb2_grpc
from mmserve_core.wire.tensors import MAX_CHUNK_BYTES, iter_views

log = get_logger(__name__)

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, engine: EncoderEngine) -> None:
        self.engine = engine

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        m = self.engine.metrics
        t0 = time.perf_counter()
        async with rpc_scope(context, "Encode", on_outcome=lambda o: m.requests.labels(o).inc()):
            items = codec.media_from_pb(request)
            dtype = codec.dtype_from_pb(request.output_dtype, "output_dtype", allow_unspecified=True)
            chunk = _chunk_bytes(request.max_chunk_bytes, self.engine.cfg.chunk_bytes)
            futures = await self.engine.encode(items, dtype)
            counts, hits = [], 0
            for i, fut in enumerate(futures):
                # shield: a caller that goes away must not cancel work other requests share
                item = await asyncio.shield(fut)
                counts.append(item.soft_token_count)
                hits += item.cache_hit
                yield codec.embedding_header_to_pb(i, item)
                for off, data in iter_views(item.tensor.data, chunk):
                    yield write_chunk(i, off, data)  # serialized here: one copy, not protobuf's three
                m.embedding_bytes.inc(item.tensor.nbytes)
            m.request_latency.observe(time.perf_counter() - t0)
            log.info("encoded", items=len(futures), soft_tokens=counts, cache_hits=hits,
                     ms=round((time.perf_counter() - t0) * 1000, 2))

    async def GetEncoderInfo(self, request, context):
        async with rpc_scope(context, "GetEncoderInfo"):
            e = self.engine
            towers = e.towers
            return encoder_pb2.GetEncoderInfoResponse(
                model_id=e.info.model_id,
                hidden_size=e.info.hidden_size,
                dtype=codec.DTYPE_TO_PB[towers.dtype] if towers else 0,
                modalities=[codec.MODALITY_TO_PB[m] for m in e.modalities],
                audio_sample_rate=towers.sample_rate if towers and towers.has_audio else 0,
                max_audio_seconds=e.cfg.max_audio_seconds if towers and towers.has_audio else 0,
                audio_block_seconds=e.audio_block_seconds if towers and towers.has_audio else 0,
                image_soft_token_budgets=list(towers.image_budgets) if towers and towers.has_vision else [],
                default_image_soft_tokens=towers.default_image_soft_tokens if towers and towers.has_vision else 0,
                **_video_info(e, towers),
            )


def _video_info(e, towers) -> dict:
    if towers is None or not towers.has_video:
        return {}
    return dict(max_video_seconds=e.cfg.max_video_seconds, max_video_frames=towers.video_max_frames,
                default_video_fps=towers.video_default_fps, video_frame_soft_tokens=towers.video_frame_soft_tokens)


MIN_CHUNK_BYTES = 4 << 10


def _chunk_bytes(asked: int, default: int) -> int:
    """A caller's ``max_chunk_bytes``: 0 = the server's; a tiny one would cost a message per few
    bytes (2 MB of rows as 2 million messages), a huge one would pass the message limit."""
    if asked == 0:
        return default
    if not MIN_CHUNK_BYTES <= asked <= MAX_CHUNK_BYTES:
        raise InvalidArgument(f"max_chunk_bytes must be 0 (the server's default) or in "
                              f"[{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {asked}")
    return asked


async def start_encoder_server(engine: EncoderEngine, address: str, tls: ServerTLS | None = None):
    """Bind, register, start; returns ``(server, port, health)``.

    Health stays NOT_SERVING until the caller has awaited ``engine.wait_ready()``
    and flipped it with ``set_serving`` (``service_main.serve`` does both).
    """
    server, port, health = await create_server(address, [SERVICE_NAME], tls=tls)
    add_servicer(server, EncoderServicer(engine), encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"])
    await server.start()
    return server, port, health


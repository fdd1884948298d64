"""Import point for the generated gRPC stubs.

Why: stubs are generated at install time (``setup.py``) into the gitignored
``mmserve_core/wire/pb``; in a bare source checkout (or after a .proto was edited) they are
(re)generated here on first import so ``python -m encoder_service`` works without an install step.
Import-time only; no threads involved.
"""

from __future__ import annotations

from mmserve_core.wire import protogen

if protogen.stale():
    protogen.generate()

from mmserve_core.wire.pb.mmserve.chat.v1 import chat_pb2, chat_pb2_grpc  # noqa: E402
from mmserve_core.wire.pb.mmserve.common.v1 import constraint_pb2, tensor_pb2  # noqa: E402
from mmserve_core.wire.pb.mmserve.decoder.v1 import decoder_pb2, decoder_pb2_grpc  # noqa: E402
from mmserve_core.wire.pb.mmserve.encoder.v1 import encoder_pb2, encoder_pb2_grpc  # noqa: E402

__all__ = [
    "chat_pb2",
    "chat_pb2_grpc",
    "decoder_pb2",
    "decoder_pb2_grpc",
    "encoder_pb2",
    "encoder_pb2_grpc",
    "constraint_pb2",
    "tensor_pb2",
]


def _read_encode_response(raw: bytes):
    """An ``Encode`` response message: a chunk as a zero-copy ``ChunkFrame``, anything else parsed."""
    from mmserve_core.wire.chunk_frames import read_chunk

    return read_chunk(raw) or encoder_pb2.EncodeResponse.FromString(raw)


def _write_generate_request(msg) -> bytes:
    """A ``Generate`` request message: chunks arrive serialized (``chunk_frames.write_chunk``)."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class EncoderStub(encoder_pb2_grpc.EncoderServiceStub):
    """The generated stub, with ``Encode``'s chunks read as views, not parsed and copied."""

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.Encode = channel.unary_stream(
            "/mmserve.encoder.v1.EncoderService/Encode",
            request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
            response_deserializer=_read_encode_response, _registered_method=True)


class DecoderStub(decoder_pb2_grpc.DecoderServiceStub):
    """The generated stub, with ``Generate`` taking chunks already serialized (one copy)."""

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.Generate = channel.stream_stream(
            "/mmserve.decoder.v1.DecoderService/Generate",
            request_serializer=_write_generate_request,
            response_deserializer=decoder_pb2.GenerateResponse.FromString, _registered_method=True)

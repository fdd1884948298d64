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

"""``python -m tests.tooling.withholding_decoder``: a decoder that declares fewer capabilities than it has.

Stands for an older decoder version (or one started without a feature) in the mixed-version
tests: a loopback gRPC server whose ``GetModelInfo`` is the real decoder's minus ``--drop``, whose
``Generate`` is passed through to it, and which answers ``grpc.health.v1``.  Writes its port to
``--port-file``; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mmserve_core.wire.stubs import DecoderStub, decoder_pb2_grpc


class Withholding(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, target: str, drop: set[str]) -> None:
        self.target, self.drop = target, drop

    async def GetModelInfo(self, request, context):
        async with grpc.aio.insecure_channel(self.target) as ch:
            r = await DecoderStub(ch).GetModelInfo(request)
        kept = [c for c in r.capabilities if c not in self.drop]
        del r.capabilities[:]
        r.capabilities.extend(kept)
        return r

    async def Generate(self, request_iterator, context):
        async with grpc.aio.insecure_channel(self.target) as ch:
            async for m in DecoderStub(ch).Generate(request_iterator):
                yield m


async def serve(target: str, drop: set[str], port_file: Path) -> None:
    server = grpc.aio.server()
    decoder_pb2_grpc.add_DecoderServiceServicer_to_server(Withholding(target, drop), server)
    hs = health.aio.HealthServicer()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="the real decoder, host:port")
    ap.add_argument("--drop", default="", help="comma-separated capabilities not to declare")
    ap.add_argument("--port-file", required=True, type=Path)
    a = ap.parse_args(argv)
    asyncio.run(serve(a.target, {c for c in a.drop.split(",") if c}, a.port_file))


if __name__ == "__main__":
    main()

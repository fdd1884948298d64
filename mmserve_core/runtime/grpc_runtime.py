"""gRPC plumbing shared by the encoder and decoder servers.

Why: both services need the same things around their servicers — health
(``grpc.health.v1``, SERVING only after warm-up), server reflection (so
``grpcurl list/describe`` work), the request id from metadata bound on every
log line, and one place that turns exceptions into status codes: a
``ServeError`` keeps its code and message, anything else is a bug, logged
with its traceback and answered ``INTERNAL``.

Everything here runs on the asyncio event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import traceback
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mmserve_core.runtime.logs import REQUEST_ID_HEADER, get_logger, new_request_id, request_id_var
from mmserve_core.runtime.tls import ServerTLS
from mmserve_core.wire.chunk_frames import read_chunk
from mmserve_core.wire.errors import InvalidArgument, ServeError

log = get_logger(__name__)

STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

# Large enough for a 1-megapixel PNG or a 30 s WAV in one Encode request, and for the 16 MiB
# embedding chunks our own services exchange (``tensors.MAX_CHUNK_BYTES``; 1 MiB to other callers).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# Client channels: same message ceiling as the servers (chunks stay below it).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


async def create_server(
    address: str, service_names: Sequence[str], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: ServerTLS | None = None,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """Create an aio server bound to ``address`` (port 0 = ephemeral).

    Returns ``(server, bound_port, health)``; every service in
    ``service_names`` plus the overall ``""`` service start NOT_SERVING.
    Register the servicers, then ``server.start()``, then flip health with
    :func:`set_serving` once the model is warm.
    """
    server = grpc.aio.server(options=server_options(max_message_bytes))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    if tls is not None and tls.enabled:
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    # grpc's HealthServicer answers SERVING for "" until told otherwise: a load
    # balancer (or our own launcher) would route to a process still loading.
    await set_serving(health, service_names, False)
    return server, port, health


async def set_serving(health: HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await health.set(name, status)


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register ``servicer``'s methods for ``service``, parsing request bytes here.

    Why: with the generated ``add_*_to_server``, grpc parses each request
    itself, and corrupt bytes answer ``UNKNOWN`` (unary) or raise a
    ``DecodeError`` inside the handler's stream (``INTERNAL``).  Taking the
    raw bytes and parsing them in this wrapper makes every undecodable
    message ``INVALID_ARGUMENT`` saying which message and why, for every
    RPC of every service — a rule, not a per-method check.  The same place
    refuses what a parser would otherwise drop without a word: field numbers
    outside our schema and enum values outside their enum.  Event-loop thread.
    """
    handlers = {}
    for m in service.methods:
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        impl = getattr(servicer, m.name)
        if m.client_streaming:
            behaviour = _stream_parsing(impl, req_cls, m.server_streaming, _is_chunk_shaped(m.input_type))
        else:
            behaviour = _unary_parsing(impl, req_cls, m.server_streaming)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(behaviour, request_deserializer=None, response_serializer=_serializer(resp_cls))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _serializer(cls):
    """A handler may yield a message or bytes it serialized itself (``chunk_frames``)."""
    serialize = cls.SerializeToString

    def serialize_or_pass(r):
        return r if isinstance(r, bytes) else serialize(r)
    return serialize_or_pass


def _is_chunk_shaped(descriptor) -> bool:
    """A request whose field 2 is ``chunk {uint32 = 1; uint64 = 2; bytes = 3}``: its chunk
    messages are read as ``ChunkFrame`` views (``chunk_frames``), not parsed and copied."""
    f = descriptor.fields_by_number.get(2)
    if f is None or f.name != "chunk" or f.message_type is None:
        return False
    types = {x.number: x.type for x in f.message_type.fields}
    return types == {1: f.TYPE_UINT32, 2: f.TYPE_UINT64, 3: f.TYPE_BYTES}


def _parse(cls, raw: bytes, what: str):
    try:
        msg = cls.FromString(raw)
    except DecodeError as e:
        raise InvalidArgument(f"{what} is not a valid {cls.DESCRIPTOR.full_name} ({e})") from None
    problem = _unhonourable(msg, "")
    if problem:
        raise InvalidArgument(f"{what}: {problem}")
    return msg


def _unhonourable(msg, path: str) -> str | None:
    """A field this server cannot honour, said in words: a field number its schema does not
    have (a newer client's field would otherwise be dropped without a word), or an enum
    value outside the enum.  Walks nested messages; scalars and bytes cost nothing."""
    unknown = list(UnknownFieldSet(msg))
    if unknown:
        return (f"field number {unknown[0].field_number} of {msg.DESCRIPTOR.full_name} "
                f"(at {path or 'the top level'}) is not in this server's schema, so it cannot be honoured")
    for fd in _checked_fields(msg.DESCRIPTOR):  # enums and messages only: bytes are never touched
        where = f"{path}.{fd.name}" if path else fd.name
        if fd.type == fd.TYPE_ENUM:
            values = getattr(msg, fd.name)
            for v in (values if _is_repeated(fd) else [values]):
                if fd.enum_type.values_by_number.get(v) is None:
                    return f"{where} = {v} is not a {fd.enum_type.full_name} value"
            continue
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].type != fd.TYPE_MESSAGE:
                continue
            items = [(f"{where}[{k}]", v) for k, v in getattr(msg, fd.name).items()]
        elif _is_repeated(fd):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(getattr(msg, fd.name))]
        elif msg.HasField(fd.name):
            items = [(where, getattr(msg, fd.name))]
        else:
            continue
        for p, sub in items:
            problem = _unhonourable(sub, p)
            if problem:
                return problem
    return None


@functools.cache
def _checked_fields(descriptor) -> tuple:
    return tuple(fd for fd in descriptor.fields if fd.type in (fd.TYPE_ENUM, fd.TYPE_MESSAGE))


def _is_repeated(fd) -> bool:
    return fd.is_repeated


def _unary_parsing(impl, cls, server_streaming: bool):
    async def abort_bad(raw: bytes, context):
        try:
            return _parse(cls, raw, "the request")
        except InvalidArgument as e:
            log.info("rpc rejected", status="INVALID_ARGUMENT", error=e.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)

    if server_streaming:
        async def unary_stream(raw: bytes, context):
            request = await abort_bad(raw, context)
            async for r in impl(request, context):
                yield r
        return unary_stream

    async def unary_unary(raw: bytes, context):
        return await impl(await abort_bad(raw, context), context)
    return unary_unary


def _stream_parsing(impl, cls, server_streaming: bool, chunk_shaped: bool = False):
    async def parsed(raw_iterator):
        # Nothing is kept across an await: a stream that stalls holds only what its handler kept
        # (an ``async for raw in ...`` would pin the last message's bytes, twice over with ``msg``).
        it, n = raw_iterator.__aiter__(), 0
        while True:
            try:
                raw = await it.__anext__()
            except StopAsyncIteration:
                return
            msg = read_chunk(raw) if chunk_shaped else None  # a view into raw: kept alive by msg only
            if msg is None:
                msg = _parse(cls, raw, f"stream message {n}")  # raises INVALID_ARGUMENT in the handler
            raw = None
            yield msg
            msg, n = None, n + 1

    if server_streaming:
        async def stream_stream(raw_iterator, context):
            async for r in impl(parsed(raw_iterator), context):
                yield r
        return stream_stream

    async def stream_unary(raw_iterator, context):
        return await impl(parsed(raw_iterator), context)
    return stream_unary


def request_id_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return new_request_id()


@contextlib.asynccontextmanager
async def rpc_scope(
    context: grpc.aio.ServicerContext, method: str, on_outcome: Callable[[str], None] | None = None
) -> AsyncIterator[str]:
    """Bind the request id and map exceptions to status codes for one RPC.

    ``on_outcome`` (metrics) gets ``"OK"`` or the status name the caller saw.
    """
    rid = request_id_from(context)
    token = request_id_var.set(rid)
    outcome = "OK"
    try:
        yield rid
    except ServeError as e:
        outcome = e.status
        log.info("rpc rejected", method=method, status=e.status, error=e.message)
        # The abort below chains ``e``, whose traceback keeps every frame's locals (a stalled stream's
        # half-received rows among them) alive until the cycle collector runs: free them now.
        traceback.clear_frames(e.__traceback__)
        await context.abort(STATUS.get(e.status, grpc.StatusCode.INTERNAL), e.message)
    except grpc.aio.AbortError:
        raise
    except asyncio.CancelledError:
        outcome = "CANCELLED"
        raise
    except Exception as e:  # noqa: BLE001 - a bug: log with traceback, answer INTERNAL
        outcome = "INTERNAL"
        log.exception("rpc failed", method=method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(e).__name__}: {e}")
    finally:
        if on_outcome is not None:
            on_outcome(outcome)
        request_id_var.reset(token)

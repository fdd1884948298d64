"""A small Python client for mmserve's three gRPC APIs: chat (gateway), encoder, decoder.

Why: internal callers should not base64 media, render chat templates or
count soft tokens.  ``ChatClient`` sends typed messages with raw bytes to
the gateway's ``mmserve.chat.v1`` API; ``EncoderClient`` / ``DecoderClient``
expose the low-level RPCs for callers that place embeddings themselves.
It speaks the wire through the same ``codec`` the services use — one dtype
table, one reassembly of embedding chunks with its offset and size checks,
the chat fields from ``fields.CHAT_FIELDS`` — and returns typed results
(``Reply``, ``ChatDelta`` / ``ChatFinal``, ``Encoded``, ``TokenEvent`` /
``Completion``, ``ModelInfo``), never protobuf messages.  Every client sets
what the services expect: message-size limits, retries of UNAVAILABLE for
calls that are safe to repeat (gRPC's own retry policy, via service
config), a default deadline, the ``x-request-id`` metadata, and TLS when
given credentials.  Sync classes use ``grpc``; ``Async*`` classes use
``grpc.aio`` and must be created inside a running event loop.

Example::

    from mmserve_core.client import Audio, ChatClient, Image

    with ChatClient("127.0.0.1:50050") as client:
        reply = client.chat([{"role": "user", "content": ["What is this?", Image(png_bytes)]}],
                            max_tokens=64)
        print(reply.content, reply.usage.prompt_tokens)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from mmserve_core.runtime.grpc_runtime import CHANNEL_OPTIONS
from mmserve_core.wire import codec, fields
from mmserve_core.wire import types as T
from mmserve_core.wire.chunk_frames import write_chunk
from mmserve_core.wire.generate_stream import write_generate
from mmserve_core.wire.stubs import (
    DecoderStub,
    EncoderStub,
    chat_pb2,
    chat_pb2_grpc,
    decoder_pb2,
    encoder_pb2,
)
from mmserve_core.wire.tensors import MAX_CHUNK_BYTES, RawTensor, iter_views
from mmserve_core.wire.types import Completion, Constraint, ModelInfo, TokenEvent, Tool, ToolCall

__all__ = ["AsyncChatClient", "AsyncDecoderClient", "AsyncEncoderClient", "Audio", "ChatClient", "ChatDelta",
           "ChatFinal", "Completion", "Constraint", "DecoderClient", "Encoded", "EncoderClient", "Image", "ModelInfo", "Reply",
           "TokenEvent", "Tool", "ToolCall", "Video", "chat_request"]

_RETRY = {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
          "retryableStatusCodes": ["UNAVAILABLE"]}
_SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [
    {"service": "mmserve.chat.v1.ChatService", "method": "CompleteUnary"},
    {"service": "mmserve.encoder.v1.EncoderService"},
    {"service": "mmserve.decoder.v1.DecoderService", "method": "GetModelInfo"},
], "retryPolicy": _RETRY}]})
_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
_ROLES = {v: k for k, v in codec.ROLE_FROM_PB.items()}
_DETAIL = {v: k for k, v in codec.DETAIL_FROM_PB.items()}


# ---------------------------------------------------------------------------- message parts and results
@dataclass(frozen=True)
class Image:
    """Image file bytes (PNG/JPEG/WebP/GIF/BMP); ``detail`` "low" | "auto" | "high"."""

    data: bytes
    mime_type: str = ""
    detail: str = "auto"


@dataclass(frozen=True)
class Audio:
    """Audio file bytes (WAV/MP3/FLAC/OGG); ``format`` may be left empty (sniffed)."""

    data: bytes
    format: str = ""


@dataclass(frozen=True)
class Video:
    """Video file bytes (MP4/MOV/WebM/MKV, or an animated GIF): ``fps`` frames sampled a second (0 = the
    default, 2), ``max_frames`` (0 = the model's cap, 32), ``audio_track``: its own track after its frames."""

    data: bytes
    fps: float = 0.0
    max_frames: int = 0
    audio_track: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    soft_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timings:
    encode_ms: float
    queued_ms: float
    prefill_ms: float
    decode_ms: float


@dataclass(frozen=True)
class ChatDelta:
    """Text (and thought-channel text, token ids, logprobs, tool-call pieces) generated since the
    last delta."""

    content: str
    reasoning_content: str
    token_ids: list[int]
    logprobs: list
    tool_calls: list[T.ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class ChatFinal:
    """The end of a reply: finish reason, usage, timings (and the prompt ids when asked)."""

    id: str
    model: str
    finish_reason: str
    usage: Usage
    timings: Timings
    prompt_token_ids: list[int]
    tool_calls: list[T.ToolCall] = field(default_factory=list)  # the reply's complete calls


@dataclass
class Reply:
    content: str
    reasoning_content: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: Usage
    timings: Timings
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    tool_calls: list[T.ToolCall] = field(default_factory=list)


def _delta(d: chat_pb2.Delta) -> ChatDelta:
    return ChatDelta(d.content, d.reasoning_content, list(d.token_ids), list(d.logprobs),
                     [T.ToolCallDelta(t.index, t.id or None, t.name or None, t.arguments) for t in d.tool_calls])


def _final(f: chat_pb2.Final) -> ChatFinal:
    u, t = f.usage, f.timings
    return ChatFinal(f.id, f.model, chat_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower(),
                     Usage(u.prompt_tokens, u.completion_tokens, u.soft_tokens, u.cached_tokens),
                     Timings(t.encode_ms, t.queued_ms, t.prefill_ms, t.decode_ms), list(f.prompt_token_ids),
                     [T.ToolCall(c.id, c.name, c.arguments_json) for c in f.tool_calls])


def _reply(message: chat_pb2.Delta, final: chat_pb2.Final) -> Reply:
    d, f = _delta(message), _final(final)
    return Reply(d.content, d.reasoning_content, d.token_ids, f.finish_reason, f.usage, f.timings,
                 f.prompt_token_ids, d.logprobs, f.tool_calls)


def _event(msg: chat_pb2.CompleteResponse) -> ChatDelta | ChatFinal:
    return _delta(msg.delta) if msg.WhichOneof("payload") == "delta" else _final(msg.final)


# ---------------------------------------------------------------------------- plumbing
def _channel(target: str, credentials: grpc.ChannelCredentials | None, aio: bool):
    mod = grpc.aio if aio else grpc
    if credentials is not None:
        return mod.secure_channel(target, credentials, options=_OPTIONS)
    return mod.insecure_channel(target, options=_OPTIONS)


def _metadata(request_id: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id or uuid.uuid4().hex),)


def _set_param(params: chat_pb2.ChatParams, f: fields.Field, value: Any) -> None:
    if f.kind == "stop":
        params.stop.extend([value] if isinstance(value, str) else list(value))
    elif f.kind == "bias":
        params.logit_bias.update({int(k): float(v) for k, v in value.items()})
    else:
        setattr(params, f.proto, value)


_TOOL_CHOICE = {v: k for k, v in codec.TOOL_CHOICE_FROM_PB.items()}


def chat_request(messages: Sequence[dict], *, model: str = "", enable_thinking: bool | None = None,
                 return_prompt_token_ids: bool = False, constraint: T.Constraint | None = None,
                 tools: Sequence[T.Tool] = (), tool_choice: str | None = None,
                 parallel_tool_calls: bool | None = None, **params: Any) -> chat_pb2.ChatRequest:
    """Build the typed request.  ``content`` is a string or a list of str / ``Image`` / ``Audio`` / ``Video``;
    ``params`` are the fields of ``mmserve_core.wire.fields.CHAT_FIELDS`` (``max_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``logit_bias``, the
    penalties, ``logprobs``, ``top_logprobs``, ``include_reasoning``); the gateway checks them.
    ``constraint``: what the reply must match (``Constraint("json_schema", json.dumps(schema))``,
    ``"json_object"``, ``"regex"``, ``"lark"``), enforced by the decoder.

    Tools: ``tools`` are ``Tool(name, description, parameters_schema)``; ``tool_choice`` is
    ``"none"``, ``"auto"``, ``"required"`` or the name of one tool (forced); an assistant message
    may carry ``"tool_calls": [ToolCall(id, name, arguments_json)]`` and a ``"role": "tool"``
    message ``"tool_call_id"`` with its result as ``content``."""
    unknown = sorted(set(params) - set(fields.BY_NAME))
    if unknown:
        raise TypeError(f"unknown chat parameters {unknown}; the fields are {sorted(fields.BY_NAME)}")
    msgs = []
    for m in messages:
        content = m.get("content")
        parts = []
        for p in [content] if isinstance(content, (str, Image, Audio, Video)) else content or ():
            if isinstance(p, str):
                parts.append(chat_pb2.Part(text=p))
            elif isinstance(p, Image):
                parts.append(chat_pb2.Part(image=chat_pb2.ImagePart(data=p.data, mime_type=p.mime_type,
                                                                    detail=_DETAIL[p.detail])))
            elif isinstance(p, Audio):
                parts.append(chat_pb2.Part(audio=chat_pb2.AudioPart(data=p.data, format=p.format)))
            elif isinstance(p, Video):
                track = chat_pb2.VIDEO_AUDIO_TRACK_INCLUDE if p.audio_track else chat_pb2.VIDEO_AUDIO_TRACK_OFF
                parts.append(chat_pb2.Part(video=chat_pb2.VideoPart(data=p.data, fps=p.fps, max_frames=p.max_frames,
                                                                    audio_track=track)))
            else:
                raise TypeError(f"a content part must be str, Image, Audio or Video, got {type(p).__name__}")
        msgs.append(chat_pb2.Message(role=_ROLES[m["role"]], parts=parts, tool_call_id=m.get("tool_call_id", ""),
                                     tool_calls=[codec.tool_call_to_pb(c) for c in m.get("tool_calls", ())]))
    out = chat_pb2.ChatParams()
    for name, value in params.items():
        if value is not None:
            _set_param(out, fields.BY_NAME[name], value)
    if enable_thinking is not None:
        out.enable_thinking = enable_thinking
    if constraint is not None:
        out.constraint.CopyFrom(codec.constraint_to_pb(constraint))
    req = chat_pb2.ChatRequest(messages=msgs, params=out, return_prompt_token_ids=return_prompt_token_ids,
                               model=model, tools=[codec.tool_to_pb(t) for t in tools])
    if tool_choice is not None:
        named = tool_choice not in _TOOL_CHOICE
        req.tool_choice.mode = _TOOL_CHOICE["function" if named else tool_choice]
        req.tool_choice.function_name = tool_choice if named else ""
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    return req


def _relay(call) -> Iterator:
    """A server stream's messages; the call is cancelled when the consumer stops early."""
    try:
        yield from call
    finally:
        call.cancel()


async def _arelay(call) -> AsyncIterator:
    """The asyncio form of ``_relay``."""
    try:
        async for msg in call:
            yield msg
    finally:
        call.cancel()


class _Client:
    """A channel + stub to one service; subclasses name the stub, sync or asyncio, and the deadline."""

    _STUB: Any
    _AIO: bool
    _TIMEOUT_S: float

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float | None = None) -> None:
        self.channel = _channel(target, credentials, aio=self._AIO)
        self.stub = self._STUB(self.channel)
        self.timeout_s = self._TIMEOUT_S if timeout_s is None else timeout_s


# ---------------------------------------------------------------------------- chat
class ChatClient(_Client):
    """The gateway's typed chat API (``mmserve.chat.v1``), blocking."""

    _STUB, _AIO, _TIMEOUT_S = chat_pb2_grpc.ChatServiceStub, False, 600.0

    def chat(self, messages: Sequence[dict], *, request_id: str | None = None, **params) -> Reply:
        r = self.stub.CompleteUnary(chat_pb2.CompleteUnaryRequest(chat=chat_request(messages, **params)),
                                    timeout=self.timeout_s, metadata=_metadata(request_id))
        return _reply(r.message, r.final)

    def stream(self, messages: Sequence[dict], *, request_id: str | None = None,
               **params) -> Iterator[ChatDelta | ChatFinal]:
        """``ChatDelta``s as they are generated, then one ``ChatFinal``.
        Closing the iterator early cancels the generation."""
        call = self.stub.Complete(chat_pb2.CompleteRequest(chat=chat_request(messages, **params)),
                                  timeout=self.timeout_s, metadata=_metadata(request_id))
        for msg in _relay(call):
            yield _event(msg)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncChatClient(_Client):
    """The gateway's typed chat API on asyncio (create inside a running loop)."""

    _STUB, _AIO, _TIMEOUT_S = chat_pb2_grpc.ChatServiceStub, True, 600.0

    async def chat(self, messages: Sequence[dict], *, request_id: str | None = None, **params) -> Reply:
        r = await self.stub.CompleteUnary(chat_pb2.CompleteUnaryRequest(chat=chat_request(messages, **params)),
                                          timeout=self.timeout_s, metadata=_metadata(request_id))
        return _reply(r.message, r.final)

    async def stream(self, messages: Sequence[dict], *, request_id: str | None = None,
                     **params) -> AsyncIterator[ChatDelta | ChatFinal]:
        call = self.stub.Complete(chat_pb2.CompleteRequest(chat=chat_request(messages, **params)),
                                  timeout=self.timeout_s, metadata=_metadata(request_id))
        async with aclosing(_arelay(call)) as messages:  # closing early cancels the call now, not at GC
            async for msg in messages:
                yield _event(msg)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# ---------------------------------------------------------------------------- encoder / decoder
@dataclass(frozen=True)
class Encoded:
    """One media item's soft-token rows, as the decoder wants them."""

    modality: str  # "image" | "audio" | "video"
    rows: np.ndarray  # [soft tokens, hidden]; bfloat16 as uint16 bit patterns
    dtype: str
    content_hash: str
    blocks: tuple[int, ...]  # rows per prompt block (audio over 30 s has several; a video one per frame, then its track)
    frame_seconds: tuple[float, ...] = ()  # video: each frame block's stamp
    cache_hit: bool = False

    @classmethod
    def of(cls, item: T.EncodedItem) -> Encoded:
        return cls(item.modality, item.tensor.to_numpy(), item.tensor.dtype, item.content_hash, item.block_rows,
                   item.frame_seconds, item.cache_hit)


def _encode_request(items: Sequence[T.MediaInput], dtype: str | None) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(items=codec.media_to_pb(list(items)),
                                     output_dtype=codec.DTYPE_TO_PB[dtype] if dtype else 0,
                                     max_chunk_bytes=MAX_CHUNK_BYTES)  # each item in one message, no copy


def _generate_requests(ids, spans: Sequence[tuple[int, Encoded]], sampling: dict) -> Iterator:
    """The Generate stream: the setup (prompt, spans, sampling), then each span's chunks."""
    # views of the caller's arrays: written into the chunk frames directly, never copied to bytes first
    tensors = [RawTensor(memoryview(np.ascontiguousarray(e.rows)).cast("B"), e.dtype, tuple(e.rows.shape))
               for _, e in spans]
    yield decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
        prompt_token_ids=list(ids),
        spans=[codec.span_to_pb(T.Span(off, e.rows.shape[0], e.modality, e.content_hash), t)
               for (off, e), t in zip(spans, tensors)],
        sampling=codec.sampling_to_pb(T.SamplingParams(**sampling))))
    for i, t in enumerate(tensors):
        for off, data in iter_views(t.data, MAX_CHUNK_BYTES):
            yield write_chunk(i, off, data)


def _image(data: bytes, soft_tokens: int) -> T.MediaInput:
    return T.MediaInput(T.IMAGE, data, image_soft_tokens=soft_tokens)


def _audio(data: bytes) -> T.MediaInput:
    return T.MediaInput(T.AUDIO, data)


def _video(data: bytes, fps: float, max_frames: int, audio_track: bool) -> T.MediaInput:
    return T.MediaInput(T.VIDEO, data, video=T.VideoOptions(fps, max_frames, audio_track))


class EncoderClient(_Client):
    """``mmserve.encoder.v1``: media bytes in, soft-token rows out (blocking)."""

    _STUB, _AIO, _TIMEOUT_S = EncoderStub, False, 120.0

    def encode_image(self, data: bytes, *, soft_tokens: int = 0, dtype: str | None = None) -> Encoded:
        return self.encode([_image(data, soft_tokens)], dtype)[0]

    def encode_audio(self, data: bytes, *, dtype: str | None = None) -> Encoded:
        return self.encode([_audio(data)], dtype)[0]

    def encode_video(self, data: bytes, *, fps: float = 0.0, max_frames: int = 0, audio_track: bool = True,
                     dtype: str | None = None) -> Encoded:
        """A video's frames and (``audio_track``) its own audio track: ``blocks`` holds a block per frame
        (stamped in ``frame_seconds``), then the track's."""
        return self.encode([_video(data, fps, max_frames, audio_track)], dtype)[0]

    def encode(self, items: Sequence[T.MediaInput], dtype: str | None = None) -> list[Encoded]:
        stream = codec.EncodedStream(len(items))
        for msg in self.stub.Encode(_encode_request(items, dtype), timeout=self.timeout_s, metadata=_metadata(None)):
            stream.add(msg)
        return [Encoded.of(it) for it in stream.items()]

    def close(self) -> None:
        self.channel.close()


class DecoderClient(_Client):
    """``mmserve.decoder.v1``: prompt ids + placed rows in, tokens out (blocking)."""

    _STUB, _AIO, _TIMEOUT_S = DecoderStub, False, 600.0

    def model_info(self) -> ModelInfo:
        return codec.model_info_from_pb(
            self.stub.GetModelInfo(decoder_pb2.GetModelInfoRequest(), timeout=self.timeout_s))

    def generate(self, ids: Sequence[int], spans: Sequence[tuple[int, Encoded]] = (), *,
                 request_id: str | None = None, **sampling) -> Iterator[TokenEvent | Completion]:
        """``spans``: ``(offset of the first placeholder, Encoded)`` — one per prompt block;
        ``sampling``: ``SamplingParams`` fields.  Yields ``TokenEvent``s, then one ``Completion``."""
        call = self.stub.Generate(_generate_requests(ids, spans, sampling), timeout=self.timeout_s,
                                  metadata=_metadata(request_id))
        for msg in _relay(call):
            yield codec.generate_response_from_pb(msg)

    def close(self) -> None:
        self.channel.close()


class AsyncEncoderClient(_Client):
    """``mmserve.encoder.v1`` on asyncio."""

    _STUB, _AIO, _TIMEOUT_S = EncoderStub, True, 120.0

    async def encode_image(self, data: bytes, *, soft_tokens: int = 0, dtype: str | None = None) -> Encoded:
        return (await self.encode([_image(data, soft_tokens)], dtype))[0]

    async def encode_audio(self, data: bytes, *, dtype: str | None = None) -> Encoded:
        return (await self.encode([_audio(data)], dtype))[0]

    async def encode_video(self, data: bytes, *, fps: float = 0.0, max_frames: int = 0, audio_track: bool = True,
                           dtype: str | None = None) -> Encoded:
        return (await self.encode([_video(data, fps, max_frames, audio_track)], dtype))[0]

    async def encode(self, items: Sequence[T.MediaInput], dtype: str | None = None) -> list[Encoded]:
        stream = codec.EncodedStream(len(items))
        async for msg in self.stub.Encode(_encode_request(items, dtype), timeout=self.timeout_s,
                                          metadata=_metadata(None)):
            stream.add(msg)
        return [Encoded.of(it) for it in stream.items()]

    async def close(self) -> None:
        await self.channel.close()


class AsyncDecoderClient(_Client):
    """``mmserve.decoder.v1`` on asyncio."""

    _STUB, _AIO, _TIMEOUT_S = DecoderStub, True, 600.0

    async def model_info(self) -> ModelInfo:
        return codec.model_info_from_pb(
            await self.stub.GetModelInfo(decoder_pb2.GetModelInfoRequest(), timeout=self.timeout_s))

    async def generate(self, ids: Sequence[int], spans: Sequence[tuple[int, Encoded]] = (), *,
                       request_id: str | None = None, **sampling) -> AsyncIterator[TokenEvent | Completion]:
        call = self.stub.Generate(timeout=self.timeout_s, metadata=_metadata(request_id))
        messages = _generate_requests(ids, spans, sampling)
        try:
            await write_generate(call, next(messages), messages)  # the decoder's status, never a write error
        except BaseException:
            call.cancel()
            raise
        async with aclosing(_arelay(call)) as responses:  # closing early cancels the call now, not at GC
            async for msg in responses:
                yield codec.generate_response_from_pb(msg)

    async def close(self) -> None:
        await self.channel.close()

"""A small Python client for mmserve's three gRPC APIs: chat (gateway), encoder, decoder.

Why: internal callers should not base64 media, render chat templates or
count soft tokens.  ``ChatClient`` sends typed messages with raw bytes to
the gateway's ``mmserve.chat.v1`` API; ``EncoderClient`` / ``DecoderClient``
expose the low-level RPCs for callers that place embeddings themselves.
Every client sets what the services expect: message-size limits, retries of
UNAVAILABLE for calls that are safe to repeat (gRPC's own retry policy, via
service config), a default deadline, the ``x-request-id`` metadata, and TLS
when given credentials.  Sync classes use ``grpc``; ``Async*`` classes use
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
from mmserve_core.wire.generate_stream import write_generate
from mmserve_core.wire.stubs import (
    chat_pb2,
    chat_pb2_grpc,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    tensor_pb2,
)
from mmserve_core.wire.tensors import NUMPY_HOLDER, iter_chunks

_RETRY = {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
          "retryableStatusCodes": ["UNAVAILABLE"]}
_SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [
    {"service": "mmserve.chat.v1.ChatService", "method": "CompleteUnary"},
    {"service": "mmserve.encoder.v1.EncoderService"},
    {"service": "mmserve.decoder.v1.DecoderService", "method": "GetModelInfo"},
], "retryPolicy": _RETRY}]})
_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
_ROLES = {"system": chat_pb2.ROLE_SYSTEM, "developer": chat_pb2.ROLE_DEVELOPER, "user": chat_pb2.ROLE_USER,
          "assistant": chat_pb2.ROLE_ASSISTANT}
_DETAIL = {"auto": chat_pb2.IMAGE_DETAIL_UNSPECIFIED, "low": chat_pb2.IMAGE_DETAIL_LOW,
           "high": chat_pb2.IMAGE_DETAIL_HIGH}
_DTYPES = {"bfloat16": tensor_pb2.DTYPE_BFLOAT16, "float16": tensor_pb2.DTYPE_FLOAT16,
           "float32": tensor_pb2.DTYPE_FLOAT32}


# ---------------------------------------------------------------------------- message parts
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


@dataclass
class Reply:
    content: str
    reasoning_content: str
    token_ids: list[int]
    finish_reason: str
    usage: chat_pb2.Usage
    timings: chat_pb2.Timings
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)


def _channel(target: str, credentials: grpc.ChannelCredentials | None, aio: bool):
    mod = grpc.aio if aio else grpc
    if credentials is not None:
        return mod.secure_channel(target, credentials, options=_OPTIONS)
    return mod.insecure_channel(target, options=_OPTIONS)


def _metadata(request_id: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id or uuid.uuid4().hex),)


def chat_request(messages: Sequence[dict], *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), logit_bias: dict[int, float] | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 repetition_penalty: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
                 include_reasoning: bool | None = None, enable_thinking: bool | None = None,
                 return_prompt_token_ids: bool = False) -> chat_pb2.ChatRequest:
    """Build the typed request.  ``content`` is a string or a list of str / ``Image`` / ``Audio``."""
    msgs = []
    for m in messages:
        content = m["content"]
        parts = []
        for p in [content] if isinstance(content, (str, Image, Audio)) else content:
            if isinstance(p, str):
                parts.append(chat_pb2.Part(text=p))
            elif isinstance(p, Image):
                parts.append(chat_pb2.Part(image=chat_pb2.ImagePart(data=p.data, mime_type=p.mime_type,
                                                                    detail=_DETAIL[p.detail])))
            elif isinstance(p, Audio):
                parts.append(chat_pb2.Part(audio=chat_pb2.AudioPart(data=p.data, format=p.format)))
            else:
                raise TypeError(f"a content part must be str, Image or Audio, got {type(p).__name__}")
        msgs.append(chat_pb2.Message(role=_ROLES[m["role"]], parts=parts))
    params = chat_pb2.ChatParams(stop=list(stop), logit_bias=dict(logit_bias or {}), logprobs=logprobs,
                                 top_logprobs=top_logprobs)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("min_p", min_p), ("seed", seed), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty), ("repetition_penalty", repetition_penalty),
                        ("include_reasoning", include_reasoning), ("enable_thinking", enable_thinking)):
        if value is not None:
            setattr(params, name, value)
    return chat_pb2.ChatRequest(messages=msgs, params=params, return_prompt_token_ids=return_prompt_token_ids)


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


def _reply(message: chat_pb2.Delta, final: chat_pb2.Final) -> Reply:
    return Reply(message.content, message.reasoning_content, list(message.token_ids),
                 chat_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower(),
                 final.usage, final.timings, list(final.prompt_token_ids), list(message.logprobs))


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
               **params) -> Iterator[chat_pb2.CompleteResponse]:
        """Deltas as they are generated, then one message whose ``final`` is set.
        Closing the iterator early cancels the generation."""
        call = self.stub.Complete(chat_pb2.CompleteRequest(chat=chat_request(messages, **params)),
                                  timeout=self.timeout_s, metadata=_metadata(request_id))
        yield from _relay(call)

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
                     **params) -> AsyncIterator[chat_pb2.CompleteResponse]:
        call = self.stub.Complete(chat_pb2.CompleteRequest(chat=chat_request(messages, **params)),
                                  timeout=self.timeout_s, metadata=_metadata(request_id))
        async with aclosing(_arelay(call)) as messages:  # closing early cancels the call now, not at GC
            async for msg in messages:
                yield msg

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

    modality: int  # tensor_pb2.MODALITY_*
    rows: np.ndarray  # [soft tokens, hidden]; bfloat16 as uint16 bit patterns
    dtype: str
    content_hash: str
    blocks: tuple[int, ...]  # rows per prompt block (audio over 30 s has several)


def _encode_request(items: Sequence[tuple[int, bytes, int]], dtype: str | None) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(
        items=[encoder_pb2.MediaItem(modality=m, data=d, image_soft_tokens=b) for m, d, b in items],
        output_dtype=_DTYPES[dtype] if dtype else tensor_pb2.DTYPE_UNSPECIFIED)


def _collect_encoded(messages) -> list[Encoded]:
    headers, data = {}, {}
    for msg in messages:
        if msg.WhichOneof("payload") == "header":
            headers[msg.header.item_index] = msg.header
            data[msg.header.item_index] = bytearray()
        else:
            data[msg.chunk.item_index] += msg.chunk.data
    out = []
    for i in sorted(headers):
        h = headers[i]
        dtype = {v: k for k, v in _DTYPES.items()}[h.tensor.dtype]
        rows = np.frombuffer(bytes(data[i]), dtype=NUMPY_HOLDER[dtype]).reshape(tuple(h.tensor.shape))
        out.append(Encoded(h.modality, rows, dtype, h.content_hash, tuple(h.block_soft_tokens)))
    return out


def _generate_requests(ids, spans, sampling) -> Iterator[decoder_pb2.GenerateRequest]:
    yield decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
        prompt_token_ids=list(ids),
        spans=[decoder_pb2.EmbeddingSpan(
            placement=tensor_pb2.PlaceholderSpan(offset=off, length=e.rows.shape[0], modality=e.modality,
                                                 content_hash=e.content_hash),
            tensor=tensor_pb2.TensorSpec(dtype=_DTYPES[e.dtype], shape=list(e.rows.shape)))
            for off, e in spans],
        sampling=decoder_pb2.SamplingParams(**sampling)))
    for i, (_, e) in enumerate(spans):
        for off, data in iter_chunks(e.rows.tobytes(), 1 << 20):
            yield decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(span_index=i, byte_offset=off,
                                                                               data=data))


class EncoderClient(_Client):
    """``mmserve.encoder.v1``: media bytes in, soft-token rows out (blocking)."""

    _STUB, _AIO, _TIMEOUT_S = encoder_pb2_grpc.EncoderServiceStub, False, 120.0

    def encode_image(self, data: bytes, *, soft_tokens: int = 0, dtype: str | None = None) -> Encoded:
        return self._encode([(tensor_pb2.MODALITY_IMAGE, data, soft_tokens)], dtype)[0]

    def encode_audio(self, data: bytes, *, dtype: str | None = None) -> Encoded:
        return self._encode([(tensor_pb2.MODALITY_AUDIO, data, 0)], dtype)[0]

    def _encode(self, items, dtype) -> list[Encoded]:
        return _collect_encoded(self.stub.Encode(_encode_request(items, dtype), timeout=self.timeout_s,
                                                 metadata=_metadata(None)))

    def close(self) -> None:
        self.channel.close()


class DecoderClient(_Client):
    """``mmserve.decoder.v1``: prompt ids + placed rows in, tokens out (blocking)."""

    _STUB, _AIO, _TIMEOUT_S = decoder_pb2_grpc.DecoderServiceStub, False, 600.0

    def model_info(self) -> decoder_pb2.GetModelInfoResponse:
        return self.stub.GetModelInfo(decoder_pb2.GetModelInfoRequest(), timeout=self.timeout_s)

    def generate(self, ids: Sequence[int], spans: Sequence[tuple[int, Encoded]] = (), *,
                 request_id: str | None = None, **sampling) -> Iterator[decoder_pb2.GenerateResponse]:
        """``spans``: ``(offset of the first placeholder, Encoded)`` — one per prompt block."""
        def requests():
            yield from _generate_requests(ids, spans, sampling)

        call = self.stub.Generate(requests(), timeout=self.timeout_s, metadata=_metadata(request_id))
        yield from _relay(call)

    def close(self) -> None:
        self.channel.close()


class AsyncEncoderClient(_Client):
    """``mmserve.encoder.v1`` on asyncio."""

    _STUB, _AIO, _TIMEOUT_S = encoder_pb2_grpc.EncoderServiceStub, True, 120.0

    async def encode_image(self, data: bytes, *, soft_tokens: int = 0, dtype: str | None = None) -> Encoded:
        return (await self._encode([(tensor_pb2.MODALITY_IMAGE, data, soft_tokens)], dtype))[0]

    async def encode_audio(self, data: bytes, *, dtype: str | None = None) -> Encoded:
        return (await self._encode([(tensor_pb2.MODALITY_AUDIO, data, 0)], dtype))[0]

    async def _encode(self, items, dtype) -> list[Encoded]:
        call = self.stub.Encode(_encode_request(items, dtype), timeout=self.timeout_s, metadata=_metadata(None))
        return _collect_encoded([m async for m in call])

    async def close(self) -> None:
        await self.channel.close()


class AsyncDecoderClient(_Client):
    """``mmserve.decoder.v1`` on asyncio."""

    _STUB, _AIO, _TIMEOUT_S = decoder_pb2_grpc.DecoderServiceStub, True, 600.0

    async def model_info(self) -> decoder_pb2.GetModelInfoResponse:
        return await self.stub.GetModelInfo(decoder_pb2.GetModelInfoRequest(), timeout=self.timeout_s)

    async def generate(self, ids: Sequence[int], spans: Sequence[tuple[int, Encoded]] = (), *,
                       request_id: str | None = None, **sampling) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        call = self.stub.Generate(timeout=self.timeout_s, metadata=_metadata(request_id))
        messages = _generate_requests(ids, spans, sampling)
        try:
            await write_generate(call, next(messages), messages)  # the decoder's status, never a write error
        except BaseException:
            call.cancel()
            raise
        async with aclosing(_arelay(call)) as messages:  # closing early cancels the call now, not at GC
            async for msg in messages:
                yield msg

    async def close(self) -> None:
        await self.channel.close()

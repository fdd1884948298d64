"""Raw calls and hand-built messages for the RPC-level tests: the three services' wire, byte by byte.

Why: the hostile corpus, the regression tests and the structured-output tests send messages no
well-behaved client would (corrupt bytes, lying chunk streams, stalls), so they talk through
``stream_stream`` / ``unary_*`` methods with raw bytes and build the protobuf and media bytes
here.  ``raw_stream`` / ``raw_unary`` return the final ``(code, details)`` the caller saw.
"""

from __future__ import annotations

import io
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

from deploy.demo.media import shape_png
from mmserve_core.wire.stubs import chat_pb2, decoder_pb2, encoder_pb2, tensor_pb2

C = grpc.StatusCode
V, HID = 512, 64  # the tiny e2b checkpoint's vocabulary and hidden size
BOS, TURN, EOT = 2, 105, 106
IMG_PH, AUD_PH, VID_PH, BOI, EOI, BOA, EOA = 252, 253, 249, 250, 254, 251, 255
TEXT = [BOS, TURN, 10, 11, EOT, TURN]
P = [BOS, TURN, 10, BOI] + [IMG_PH] * 4 + [EOI, EOT, TURN]  # an image block of 4 rows at offset 4
GEN = "/mmserve.decoder.v1.DecoderService/Generate"
ENC = "/mmserve.encoder.v1.EncoderService/Encode"
ENC_INFO = "/mmserve.encoder.v1.EncoderService/GetEncoderInfo"
DEC_INFO = "/mmserve.decoder.v1.DecoderService/GetModelInfo"
CHAT = "/mmserve.chat.v1.ChatService/Complete"
CHAT_UNARY = "/mmserve.chat.v1.ChatService/CompleteUnary"


@dataclass
class Env:
    """Channels to the three services (sync gRPC, raw bytes in and out)."""

    encoder: grpc.Channel
    decoder: grpc.Channel
    chat: grpc.Channel


# ----------------------------------------------------------------------------- raw calls
def _status(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return C.OK, ""


def raw_stream(env: Env, channel: str, path: str, messages: list, *, timeout: float = 30,
               pause_after: int | None = None, pause_s: float = 0.0, cancel_after_s: float | None = None):
    """Send ``messages`` (protos or raw bytes) on a client stream and read every response.

    ``pause_after`` / ``pause_s``: go quiet after that many messages (a stalled client);
    ``cancel_after_s``: cancel the call from the client side after that long."""
    ch = getattr(env, channel)
    mc = ch.stream_stream(path)

    def reqs() -> Iterator[bytes]:
        for i, m in enumerate(messages):
            if pause_after is not None and i == pause_after:
                time.sleep(pause_s)
            yield m if isinstance(m, bytes) else m.SerializeToString()
        if pause_after is not None and pause_after >= len(messages):
            time.sleep(pause_s)

    def go():
        call = mc(reqs(), timeout=timeout)
        if cancel_after_s is not None:
            threading.Timer(cancel_after_s, call.cancel).start()
        for _ in call:
            pass

    return _status(go)


def raw_unary(env: Env, channel: str, path: str, payload, *, stream_out: bool, timeout: float = 30):
    ch = getattr(env, channel)
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    if stream_out:
        return _status(lambda: list(ch.unary_stream(path)(data, timeout=timeout)))
    return _status(lambda: ch.unary_unary(path)(data, timeout=timeout))


# ----------------------------------------------------------------------------- decoder messages
def setup(ids=TEXT, spans=(), **sampling) -> decoder_pb2.GenerateRequest:
    return decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
        prompt_token_ids=ids, spans=list(spans),
        sampling=decoder_pb2.SamplingParams(**({"max_tokens": 2} | sampling))))


def span(offset=4, length=4, rows=None, hidden=HID, dtype=tensor_pb2.DTYPE_BFLOAT16,
         modality=tensor_pb2.MODALITY_IMAGE, shape=None, content_hash="") -> decoder_pb2.EmbeddingSpan:
    return decoder_pb2.EmbeddingSpan(
        placement=tensor_pb2.PlaceholderSpan(offset=offset, length=length, modality=modality,
                                             content_hash=content_hash),
        tensor=tensor_pb2.TensorSpec(dtype=dtype, shape=shape if shape is not None else
                                     [rows if rows is not None else length, hidden]))


def chunk(i=0, off=0, n=4 * HID * 2, data=None) -> decoder_pb2.GenerateRequest:
    return decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(
        span_index=i, byte_offset=off, data=data if data is not None else b"\x00" * n))


FULL = chunk()  # all 4 bf16 rows of ``span()``


# ----------------------------------------------------------------------------- encoder requests and media bytes
def enc_request(items, **kw) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(items=items, **kw)


def image_item(data: bytes, **kw) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, data=data, **kw)


def audio_item(data: bytes, **kw) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_AUDIO, data=data, **kw)


def with_exif(fmt: str, exif: bytes) -> bytes:
    img = Image.fromarray(np.tile(np.arange(48, dtype=np.uint8)[None, :, None], (24, 1, 3)))
    b = io.BytesIO()
    img.save(b, fmt, exif=(b"Exif\x00\x00" + exif) if fmt == "JPEG" else exif)
    return b.getvalue()


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    import zlib

    c = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", c)


def png_with(extra: bytes) -> bytes:
    png = shape_png(size=(16, 16))
    return png[:33] + extra + png[33:]  # after the IHDR chunk


def ihdr(w: int, h: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))


def wav_with(rate=16000, channels=1, bits=16, data_bytes=None, fmt_tag=1, body=b"\x00\x00" * 1600) -> bytes:
    n = len(body) if data_bytes is None else data_bytes
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * channels * max(bits, 8) // 8,
                      channels * max(bits, 8) // 8, bits)
    return b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + \
        b"data" + struct.pack("<I", n) + body


def jpeg_icc(profile: bytes) -> bytes:
    jpeg = shape_png(size=(16, 16), fmt="JPEG")
    body = b"ICC_PROFILE\x00\x01\x01" + profile
    return jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


# ----------------------------------------------------------------------------- chat
def chat_req(messages=None, model="", **params) -> chat_pb2.CompleteUnaryRequest:
    if messages is None:
        messages = [chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=[chat_pb2.Part(text="hi")])]
    return chat_pb2.CompleteUnaryRequest(chat=chat_pb2.ChatRequest(
        messages=messages, params=chat_pb2.ChatParams(**({"max_tokens": 2} | params)), model=model))


def user(*parts) -> list:
    return [chat_pb2.Message(role=chat_pb2.ROLE_USER, parts=list(parts))]

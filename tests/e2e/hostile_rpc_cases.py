"""The RPC-level hostile corpus: what an attacker or a buggy client sends to each service
(the raw calls and message builders are in ``rpc_calls``).

Each case is ``Case(name, service, run, expect)``: ``run(env)`` makes the
call(s) and returns the final status ``(code, details)`` the caller saw;
``expect`` is the set of codes that count as a clean answer for it (``OK``
where the input is odd but valid).  ``INTERNAL`` and ``UNKNOWN`` are never
in any set: they mean mmserve treated bad input as a bug.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from deploy.demo.media import shape_png, tone_wav
from mmserve_core.wire.stubs import chat_pb2, constraint_pb2, encoder_pb2, tensor_pb2
from tests.e2e.hostile_video import video_cases
from tests.e2e.rpc_calls import (
    AUD_PH,
    BOA,
    BOI,
    BOS,
    CHAT,
    CHAT_UNARY,
    DEC_INFO,
    ENC,
    ENC_INFO,
    EOA,
    EOI,
    EOT,
    FULL,
    GEN,
    HID,
    IMG_PH,
    TURN,
    VID_PH,
    Env,
    P,
    V,
    audio_item,
    chat_req,
    chunk,
    enc_request,
    ihdr,
    image_item,
    jpeg_icc,
    png_chunk,
    png_with,
    raw_stream,
    raw_unary,
    setup,
    span,
    user,
    wav_with,
    with_exif,
)
from tests.helpers import exif_block

C = grpc.StatusCode
REFUSED = frozenset({C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.OUT_OF_RANGE})
OK = frozenset({C.OK})
OK_OR_REFUSED = OK | REFUSED
STALLED = frozenset({C.DEADLINE_EXCEEDED})
BUSY = frozenset({C.RESOURCE_EXHAUSTED})

@dataclass(frozen=True)
class Case:
    name: str
    service: str  # "encoder" | "decoder" | "chat"
    run: Callable
    expect: frozenset


# ----------------------------------------------------------------------------- decoder messages
def dec(name, messages, expect=REFUSED, **kw) -> Case:
    return Case(name, "decoder", lambda env: raw_stream(env, "decoder", GEN, messages, **kw), expect)


def sampling_cases() -> list[Case]:
    """Every SamplingParams field at its extremes and one past them."""
    f32max, tiny = 3.4028234e38, 1e-38
    table = [
        ("temperature", [(0.0, OK), (-0.0, OK), (tiny, OK_OR_REFUSED), (f32max, OK), (-1.0, REFUSED),
                         (float("inf"), REFUSED), (float("nan"), REFUSED)]),
        ("top_p", [(1.0, OK), (tiny, OK), (0.0, REFUSED), (-1.0, REFUSED), (1.0000001, REFUSED),
                   (float("nan"), REFUSED), (float("inf"), REFUSED)]),
        ("top_k", [(0, OK), (1, OK), (V - 1, OK), (V, OK), (V + 1, OK), (2**31 - 1, OK), (-1, REFUSED),
                   (-(2**31), REFUSED)]),
        ("min_p", [(0.0, OK), (1.0, OK), (tiny, OK), (1.5, REFUSED), (-0.1, REFUSED), (float("nan"), REFUSED)]),
        ("max_tokens", [(1, OK), (0, REFUSED), (4096, REFUSED), (2**32 - 1, REFUSED)]),
        ("seed", [(0, OK), (2**64 - 1, OK)]),
        ("repetition_penalty", [(1.0, OK), (tiny, OK_OR_REFUSED), (f32max, OK), (0.0, REFUSED), (-1.0, REFUSED),
                                (float("nan"), REFUSED), (float("inf"), REFUSED)]),
        ("presence_penalty", [(f32max, OK), (-f32max, OK), (float("nan"), REFUSED), (float("-inf"), REFUSED)]),
        ("frequency_penalty", [(f32max, OK), (-f32max, OK), (float("nan"), REFUSED), (float("inf"), REFUSED)]),
        ("top_logprobs", [(21, REFUSED), (2**32 - 1, REFUSED)]),
    ]
    cases = []
    for field, values in table:
        for v, expect in values:
            kw = {field: v}
            if field != "max_tokens":
                kw["max_tokens"] = 2
            if field in ("top_p", "top_k", "min_p"):
                kw.setdefault("temperature", 1.0)
            cases.append(dec(f"sampling {field}={v!r}", [setup(**kw)], expect))
    cases += [
        dec("top_k at the vocabulary with temperature 1", [setup(top_k=V, temperature=1.0, seed=1)], OK),
        dec("top_logprobs 20 with logprobs", [setup(logprobs=True, top_logprobs=20)], OK),
        dec("top_logprobs without logprobs", [setup(top_logprobs=5)]),
        dec("logit_bias id -1", [setup(logit_bias={-1: 1.0})]),
        dec("logit_bias id = vocabulary size", [setup(logit_bias={V: 1.0})]),
        dec("logit_bias id int32 max", [setup(logit_bias={2**31 - 1: 1.0})]),
        dec("logit_bias id int32 min", [setup(logit_bias={-(2**31): 1.0})]),
        dec("logit_bias NaN", [setup(logit_bias={5: float("nan")})]),
        dec("logit_bias +inf", [setup(logit_bias={5: float("inf")})]),
        dec("logit_bias -inf", [setup(logit_bias={5: float("-inf")})]),
        dec("logit_bias float max", [setup(logit_bias={5: f32max})], OK),
        dec("stop_token_ids -1", [setup(stop_token_ids=[-1])]),
        dec("stop_token_ids = vocabulary size", [setup(stop_token_ids=[V])]),
        dec("stop_token_ids int32 max", [setup(stop_token_ids=[2**31 - 1])]),
        dec("17 stop strings", [setup(stop=[f"s{i}" for i in range(17)])]),
        dec("empty stop string", [setup(stop=[""])]),
        dec("100 kB stop string", [setup(stop=["x" * 100_000])], OK),
        dec("NUL stop string", [setup(stop=["\x00"])], OK),
        dec("constraint: a JSON schema that is not JSON", [setup(constraint=constraint_pb2.OutputConstraint(
            json_schema="{nope"))]),
        dec("constraint: a regex with a look-ahead", [setup(constraint=constraint_pb2.OutputConstraint(
            regex="(?=a)b"))]),
        dec("constraint: json_object false", [setup(constraint=constraint_pb2.OutputConstraint(json_object=False))]),
        dec("constraint: an empty regex", [setup(constraint=constraint_pb2.OutputConstraint(regex=""))]),
        dec("constraint: a Lark grammar that does not parse", [setup(constraint=constraint_pb2.OutputConstraint(
            lark="start: ((("))]),
        dec("constraint: json_object, 2 tokens", [setup(constraint=constraint_pb2.OutputConstraint(
            json_object=True))], OK),
    ]
    return cases


def wire_cases() -> list[Case]:
    """Bytes that are not a GenerateRequest, first or after a valid setup."""
    rng = np.random.default_rng(7)
    garbage = [("0xff", b"\xff"), ("four 0xff", b"\xff" * 4), ("length past the end", b"\x0a\xff\xff\xff\xff\x0f"),
               ("truncated length-delimited", b"\x0a\x05abc"), ("truncated varint", b"\x08"),
               ("start-group tag", b"\x0b"), ("wire type 7", b"\x0f"),
               # setup { sampling { stop: "\xc3\x28" } }: proto3 strings must be UTF-8
               ("invalid UTF-8 in a stop string", b"\x0a\x06\x1a\x04\x62\x02\xc3\x28")]
    garbage += [(f"random bytes #{i}", rng.bytes(int(rng.integers(1, 300)))) for i in range(4)]
    cases = [dec(f"corrupt first message: {n}", [b]) for n, b in garbage]
    cases += [dec(f"corrupt message after a text setup: {n}", [setup(), b]) for n, b in garbage[:4]]
    cases += [dec(f"corrupt message after a setup with spans: {n}", [setup(P, [span()]), b]) for n, b in garbage[:4]]
    cases += [
        dec("empty message first", [b""]),
        dec("chunk before the setup", [FULL]),
        dec("corrupt chunk between two good ones", [setup(P, [span(length=4)]), chunk(n=256), b"\xff\xff",
                                                    chunk(off=256, n=256)]),
    ]
    return cases


def span_cases() -> list[Case]:
    """Spans and chunk streams that lie about where and how big their rows are."""
    vid = [BOS, TURN, 10] + [VID_PH] * 4 + [EOT, TURN]
    aud = [BOS, TURN, 10, BOA] + [AUD_PH] * 4 + [EOA, EOT, TURN]
    return [
        dec("placeholders without a span", [setup(P)]),
        dec("video placeholders in a prompt", [setup(vid)]),
        dec("video placeholders under an image span", [setup(vid, [span(offset=3)]), FULL]),
        dec("audio placeholders without a span", [setup(aud)]),
        dec("span modality unknown (99)", [setup(P, [span(modality=99)]), FULL]),
        dec("span modality unspecified", [setup(P, [span(modality=0)]), FULL]),
        dec("span dtype unknown (99)", [setup(P, [span(dtype=99)]), FULL]),
        dec("span dtype unspecified", [setup(P, [span(dtype=0)]), FULL]),
        dec("span length 0", [setup(P, [span(length=0, rows=0)])]),
        dec("span offset uint32 max", [setup(P, [span(offset=2**32 - 1)]), FULL]),
        dec("span length uint32 max", [setup(P, [span(length=2**32 - 1, rows=4)]), FULL]),
        dec("span past the end", [setup(P, [span(offset=9, length=8)]), chunk(n=8 * HID * 2)]),
        dec("span over text ids", [setup(P, [span(offset=1)]), FULL]),
        dec("overlapping spans", [setup(P, [span(length=3, rows=3), span(offset=5, length=3, rows=3)]),
                                  chunk(n=384), chunk(1, n=384)]),
        dec("spans out of order", [setup(P, [span(offset=6, length=2), span(offset=4, length=2)]),
                                   chunk(n=256), chunk(1, n=256)]),
        dec("rows disagree with the span", [setup(P, [span(rows=5)]), chunk(n=5 * 128)]),
        dec("wrong hidden size", [setup(P, [span(hidden=63)]), chunk(n=4 * 126)]),
        dec("shape of three dims", [setup(P, [span(shape=[4, HID, 1])]), FULL]),
        dec("shape empty", [setup(P, [span(shape=[])]), FULL]),
        dec("shape [0, hidden]", [setup(P, [span(shape=[0, HID])])]),
        dec("shape with a negative dim", [setup(P, [span(shape=[-1, HID])]), FULL]),
        dec("shape int64 max", [setup(P, [span(shape=[2**62, 2**62])]), FULL]),
        dec("shape [rows, int64 max]", [setup(P, [span(shape=[4, 2**63 - 1])]), FULL]),
        dec("chunks stop short", [setup(P, [span()]), chunk(n=100)]),
        dec("empty chunk, then close", [setup(P, [span()]), chunk(n=0)]),
        dec("chunk for an unknown span", [setup(P, [span()]), chunk(3, n=512)]),
        dec("chunk span_index uint32 max", [setup(P, [span()]), chunk(2**32 - 1, n=512)]),
        dec("chunk byte_offset uint64 max", [setup(P, [span()]), chunk(off=2**64 - 1, n=512)]),
        dec("chunk at the wrong offset", [setup(P, [span()]), chunk(off=64, n=448)]),
        dec("the same chunk twice", [setup(P, [span()]), chunk(n=256), chunk(n=256)]),
        dec("more bytes than declared", [setup(P, [span()]), FULL, chunk(off=512, n=8)]),
        dec("one chunk bigger than the span", [setup(P, [span()]), chunk(n=1024)]),
        dec("a second setup after the chunks", [setup(P, [span()]), FULL, setup(P, [span()])]),
        dec("a second setup instead of chunks", [setup(P, [span()]), setup()]),
        dec("a second text setup", [setup(), setup()]),
        dec("stream closed after a setup with spans", [setup(P, [span()])]),
        dec("empty prompt", [setup([])]),
        dec("prompt fills the context", [setup([10] * 4096)]),
        dec("token id -1", [setup([BOS, -1])]),
        dec("token id = vocabulary size", [setup([BOS, V])]),
        dec("token id int32 max", [setup([BOS, 2**31 - 1])]),
        dec("10 kB content hash", [setup(P, [span(content_hash="h" * 10_000)]), FULL], OK),
        dec("float32 rows for a bfloat16 model", [setup(P, [span(dtype=tensor_pb2.DTYPE_FLOAT32)]),
                                                  chunk(n=4 * HID * 4)], OK),
        dec("rows of NaN", [setup(P, [span(dtype=tensor_pb2.DTYPE_FLOAT32)]),
                            chunk(data=np.full((4, HID), np.nan, np.float32).tobytes())], OK_OR_REFUSED),
        Case("GetModelInfo corrupt bytes", "decoder",
             lambda env: raw_unary(env, "decoder", DEC_INFO, b"\xff\xff", stream_out=False), REFUSED),
    ]


def stall_cases() -> list[Case]:
    """Half-open and cancelled streams (the module's decoder idles streams out after 1 s)."""
    return [
        dec("nothing sent, stream held open", [], STALLED, pause_after=0, pause_s=4),
        dec("setup with spans, then silence", [setup(P, [span()])], STALLED, pause_after=1, pause_s=4),
        dec("half the chunks, then silence", [setup(P, [span()]), chunk(n=256)], STALLED, pause_after=2, pause_s=4),
        dec("text setup, then silence (never closed)", [setup()], STALLED, pause_after=1, pause_s=4),
        dec("cancelled after the setup", [setup(P, [span()])], frozenset({C.CANCELLED}), pause_after=1,
            pause_s=2, cancel_after_s=0.3),
        dec("cancelled mid-chunks", [setup(P, [span()]), chunk(n=256)], frozenset({C.CANCELLED}),
            pause_after=2, pause_s=2, cancel_after_s=0.3),
        dec("cancelled while generating", [setup(max_tokens=2000, logit_bias={1: -100.0, 106: -100.0, 50: -100.0})],
            frozenset({C.CANCELLED}), cancel_after_s=0.5),
        dec("client deadline while stalled", [setup(P, [span()])], frozenset({C.DEADLINE_EXCEEDED}),
            pause_after=1, pause_s=2, timeout=0.4),
    ]


def limit_cases() -> list[Case]:
    """The open-streams and reserved-bytes caps (the module's decoder: 12 streams, 4 MiB)."""
    def hold(n: int, messages, then) -> Callable:
        def run(env: Env):
            threads = [threading.Thread(target=raw_stream, args=(env, "decoder", GEN, messages),
                                        kwargs={"pause_after": len(messages), "pause_s": 3}) for _ in range(n)]
            for t in threads:
                t.start()
            time.sleep(0.7)  # all of them are open and stalled now (the idle timeout is 1 s)
            try:
                return then(env)
            finally:
                for t in threads:
                    t.join()
        return run

    big = [BOS, TURN, 10, BOI] + [IMG_PH] * 4000 + [EOI, EOT, TURN]  # 4000 f32 rows = 1,024,000 bytes
    big_setup = setup(big, [span(length=4000, dtype=tensor_pb2.DTYPE_FLOAT32)])
    return [
        Case("open streams over --max-open-streams", "decoder",
             hold(12, [setup()], lambda env: raw_stream(env, "decoder", GEN, [setup()])), BUSY),
        Case("declared bytes over --max-buffered-bytes", "decoder",
             hold(4, [big_setup, chunk(n=500_000)],
                  lambda env: raw_stream(env, "decoder", GEN, [big_setup, chunk(n=1_024_000)])), BUSY),
    ]


def decoder_cases() -> list[Case]:
    return sampling_cases() + wire_cases() + span_cases() + stall_cases() + limit_cases()


# ----------------------------------------------------------------------------- encoder
def enc(name, request, expect=REFUSED) -> Case:
    return Case(name, "encoder", lambda env: raw_unary(env, "encoder", ENC, request, stream_out=True), expect)


tiff_ifd = exif_block


ORIENT6 = (0x0112, 3, 1, struct.pack("<H", 6))
EXIF_BLOCKS = {
    "orientation 6 + StripOffsets as text": tiff_ifd([ORIENT6, (0x0111, 2, 6, b"hello\x00")]),
    "orientation 6 + a tag with a huge count": tiff_ifd([ORIENT6, (0x010E, 2, 2**31, b"abcd")]),
    "orientation 6 + an unknown type": tiff_ifd([ORIENT6, (0x0131, 99, 1, b"abcd")]),
    "orientation as text": tiff_ifd([(0x0112, 2, 4, b"six\x00")]),
    "orientation 9": tiff_ifd([(0x0112, 3, 1, struct.pack("<H", 9))]),
    "orientation 0": tiff_ifd([(0x0112, 3, 1, struct.pack("<H", 0))]),
    "IFD offset past the end": b"II*\x00" + struct.pack("<I", 10_000),
    "truncated IFD": tiff_ifd([ORIENT6, (0x0111, 2, 6, b"hello\x00")])[:14],
    "big-endian header, little-endian body": b"MM\x00*" + tiff_ifd([ORIENT6])[4:],
    "garbage": b"\x13\x37" * 40,
}


def encoder_cases() -> list[Case]:
    png, wav = shape_png(size=(32, 32)), tone_wav(0.3, 16000)
    jpeg = shape_png(size=(32, 32), fmt="JPEG")
    cases = [
        Case(f"Encode corrupt bytes: {n}", "encoder",
             lambda env, b=b: raw_unary(env, "encoder", ENC, b, stream_out=True), REFUSED)
        for n, b in [("0xff", b"\xff"), ("length past the end", b"\x0a\xff\xff\xff\xff\x0f"),
                     ("truncated item", b"\x0a\x10\x08\x01"), ("wire type 7", b"\x0f"),
                     ("invalid UTF-8 mime type", b"\x0a\x06\x08\x01\x1a\x02\xc3\x28")]
    ]
    cases += [Case("GetEncoderInfo corrupt bytes", "encoder",
                   lambda env: raw_unary(env, "encoder", ENC_INFO, b"\xff\xff", stream_out=False), REFUSED)]
    cases += [
        enc("no items", enc_request([])),
        enc("modality unknown (99)", enc_request([encoder_pb2.MediaItem(modality=99, data=png)])),
        enc("modality unspecified", enc_request([encoder_pb2.MediaItem(data=png)])),
        enc("output dtype unknown (99)", enc_request([image_item(png)], output_dtype=99)),
        enc("max_chunk_bytes 1", enc_request([image_item(png)], max_chunk_bytes=1)),
        enc("max_chunk_bytes uint32 max", enc_request([image_item(png)], max_chunk_bytes=2**32 - 1)),
        enc("max_chunk_bytes 4096", enc_request([image_item(png)], max_chunk_bytes=4096), OK),
        enc("image_soft_tokens 1", enc_request([image_item(png, image_soft_tokens=1)])),
        enc("image_soft_tokens 71", enc_request([image_item(png, image_soft_tokens=71)])),
        enc("image_soft_tokens uint32 max", enc_request([image_item(png, image_soft_tokens=2**32 - 1)])),
        enc("image_soft_tokens on audio", enc_request([audio_item(wav, image_soft_tokens=70)])),
        enc("empty image", enc_request([image_item(b"")])),
        enc("empty audio", enc_request([audio_item(b"")])),
        enc("a PNG sent as audio", enc_request([audio_item(png)])),
        enc("a WAV sent as an image", enc_request([image_item(wav)])),
        enc("1000 items", enc_request([image_item(png)] * 1000)),
        enc("mime type lies", enc_request([image_item(png, mime_type="audio/wav")]), OK),
    ]
    for fmt in ("JPEG", "PNG", "WEBP"):
        for n, block in EXIF_BLOCKS.items():
            cases.append(enc(f"{fmt} EXIF {n}", enc_request([image_item(with_exif(fmt, block))]), OK_OR_REFUSED))
    cases += [
        enc("PNG with a garbage ICC profile", enc_request([image_item(png_with(
            png_chunk(b"iCCP", b"junk\x00\x00" + b"\x78\x9c" + b"\xff" * 40)))]), OK_OR_REFUSED),
        enc("JPEG with a garbage ICC profile", enc_request([image_item(jpeg_icc(b"\xff" * 300))]), OK_OR_REFUSED),
        enc("PNG IHDR with a bad CRC", enc_request([image_item(png[:29] + b"\x00\x00\x00\x00" + png[33:])]),
            OK_OR_REFUSED),
        enc("PNG 65535x65535 header", enc_request([image_item(ihdr(65535, 65535) + png[33:])])),
        enc("PNG width 0", enc_request([image_item(ihdr(0, 16) + png[33:])])),
        enc("PNG with 1 MB of text chunks", enc_request([image_item(png_with(
            png_chunk(b"tEXt", b"k\x00" + b"v" * 1_000_000)))]), OK_OR_REFUSED),
        enc("PNG IDAT cut short", enc_request([image_item(png[: len(png) - 30])])),
        enc("JPEG cut after SOI", enc_request([image_item(jpeg[:2])])),
        enc("JPEG cut in the scan", enc_request([image_item(jpeg[: len(jpeg) // 2])]), OK_OR_REFUSED),
        enc("GIF header only", enc_request([image_item(b"GIF89a\x10\x00\x10\x00\x00\x00\x00")])),
        enc("BMP header lying about its size", enc_request([image_item(
            b"BM" + struct.pack("<IHHI", 2**31, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24,
                                                                         0, 0, 0, 0, 0, 0))])),
        enc("WebP RIFF size lie", enc_request([image_item(b"RIFF\xff\xff\xff\x7fWEBPVP8 " + b"\x00" * 20)])),
        enc("WAV sample rate 0", enc_request([audio_item(wav_with(rate=0))])),
        enc("WAV 0 channels", enc_request([audio_item(wav_with(channels=0))])),
        enc("WAV 7-bit samples", enc_request([audio_item(wav_with(bits=7))]), OK_OR_REFUSED),
        enc("WAV data size uint32 max - 1", enc_request([audio_item(wav_with(data_bytes=2**32 - 2))])),
        enc("WAV unknown format tag", enc_request([audio_item(wav_with(fmt_tag=0x1234))])),
        enc("WAV of NaN floats", enc_request([audio_item(wav_with(fmt_tag=3, bits=32,
                                                                  body=np.full(800, np.nan, np.float32).tobytes()))])),
        enc("WAV 2 GHz rate", enc_request([audio_item(wav_with(rate=2_000_000_000))])),
        enc("MP3 garbage after an ID3 header", enc_request([audio_item(b"ID3\x04\x00\x00\x00\x00\x00\x10" +
                                                                       b"\xff\xfb" * 300)])),
        enc("FLAC with a corrupt STREAMINFO", enc_request([audio_item(b"fLaC\x00\x00\x00\x22" + b"\xff" * 34)])),
        enc("OGG garbage", enc_request([audio_item(b"OggS\x00\x02" + b"\x00" * 20 + b"\xff" * 100)])),
    ]
    return cases + video_encoder_cases()


_EXPECT = {"ok": OK, "refused": REFUSED, "either": OK_OR_REFUSED}
_TRACK = {True: encoder_pb2.AUDIO_TRACK_INCLUDE, False: encoder_pb2.AUDIO_TRACK_OFF}


def video_item(data: bytes, **options) -> encoder_pb2.MediaItem:
    if "audio_track" in options:
        options["audio_track"] = _TRACK[options["audio_track"]]
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_VIDEO, data=data,
                                 video=encoder_pb2.VideoOptions(**options) if options else None)


def video_encoder_cases() -> list[Case]:
    """The shared video corpus, and video options at and past their bounds."""
    cases = [enc(f"video: {name}", enc_request([video_item(data, **opts)]), _EXPECT[expect])
             for name, data, opts, expect in video_cases()]
    clip = video_cases()[-1][1]
    nan = float("nan")
    cases += [
        enc(f"video option {k}={v!r}", enc_request([video_item(clip, **{k: v})]))
        for k, v in (("fps", nan), ("fps", -1.0), ("fps", 1e9), ("max_frames", 1), ("max_frames", 33),
                     ("max_frames", 2**32 - 1))
    ]
    cases += [
        enc("video option audio_track 99", enc_request([encoder_pb2.MediaItem(
            modality=tensor_pb2.MODALITY_VIDEO, data=clip, video=encoder_pb2.VideoOptions(audio_track=99))])),
        enc("video options on an image", enc_request([image_item(shape_png(size=(32, 32)),
                                                                  video=encoder_pb2.VideoOptions(fps=1.0))])),
        enc("image_soft_tokens on a video", enc_request([encoder_pb2.MediaItem(
            modality=tensor_pb2.MODALITY_VIDEO, data=clip, image_soft_tokens=70)])),
        enc("33 videos", enc_request([video_item(clip, max_frames=2)] * 33)),
    ]
    return cases


# ----------------------------------------------------------------------------- chat
def chat(name, request, expect=REFUSED) -> Case:
    return Case(name, "chat", lambda env: raw_unary(env, "chat", CHAT_UNARY, request, stream_out=False), expect)


def chat_cases() -> list[Case]:
    png, wav = shape_png(size=(32, 32)), tone_wav(0.3, 16000)
    img = lambda data, **kw: chat_pb2.Part(image=chat_pb2.ImagePart(data=data, **kw))  # noqa: E731
    aud = lambda data, **kw: chat_pb2.Part(audio=chat_pb2.AudioPart(data=data, **kw))  # noqa: E731
    nan, inf = float("nan"), float("inf")
    cases = [
        Case(f"{path.rsplit('/', 1)[1]} corrupt bytes: {n}", "chat",
             lambda env, b=b, path=path: raw_unary(env, "chat", path, b, stream_out=path == CHAT), REFUSED)
        for path in (CHAT, CHAT_UNARY)
        for n, b in [("0xff", b"\xff"), ("length past the end", b"\x0a\xff\xff\xff\xff\x0f"),
                     ("invalid UTF-8 text", b"\x0a\x0a\x0a\x08\x08\x03\x12\x04\x0a\x02\xc3\x28")]
    ]
    cases += [
        chat("no messages", chat_req([])),
        chat("role unknown (99)", chat_req([chat_pb2.Message(role=99, parts=[chat_pb2.Part(text="x")])])),
        chat("role unspecified", chat_req([chat_pb2.Message(parts=[chat_pb2.Part(text="x")])])),
        chat("a part with no kind", chat_req(user(chat_pb2.Part()))),
        chat("empty image", chat_req(user(img(b"")))),
        chat("empty video", chat_req(user(chat_pb2.Part(video=chat_pb2.VideoPart())))),
        chat("video audio_track 99", chat_req(user(chat_pb2.Part(video=chat_pb2.VideoPart(
            data=video_cases()[-1][1], audio_track=99))))),
        chat("video fps -1", chat_req(user(chat_pb2.Part(video=chat_pb2.VideoPart(data=video_cases()[-1][1], fps=-1))))),
        chat("video of random bytes", chat_req(user(chat_pb2.Part(video=chat_pb2.VideoPart(
            data=b"\x00" * 500, audio_track=chat_pb2.VIDEO_AUDIO_TRACK_OFF))))),
        chat("silent video, track asked for", chat_req(user(chat_pb2.Part(video=chat_pb2.VideoPart(
            data=next(c[1] for c in video_cases() if c[0] == "a silent MP4, track off")))))),
        chat("image detail unknown (99)", chat_req(user(img(png, detail=99)))),
        chat("corrupt image", chat_req(user(img(png[:60])))),
        chat("audio format aac", chat_req(user(aud(wav, format="aac")))),
        chat("audio format lies", chat_req(user(aud(wav, format="mp3")))),
        chat("garbage audio", chat_req(user(aud(b"\x00" * 500, format="wav")))),
        chat("image in an assistant turn", chat_req([chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT,
                                                                       parts=[img(png)])])),
        chat("max_tokens 0", chat_req(max_tokens=0)),
        chat("max_tokens uint32 max", chat_req(max_tokens=2**32 - 1)),
        chat("temperature NaN", chat_req(temperature=nan)),
        chat("temperature inf", chat_req(temperature=inf)),
        chat("temperature -1", chat_req(temperature=-1)),
        chat("temperature 3", chat_req(temperature=3)),
        chat("top_p 0", chat_req(top_p=0)),
        chat("top_p NaN", chat_req(top_p=nan)),
        chat("top_k -1", chat_req(top_k=-1)),
        chat("top_k int32 max", chat_req(top_k=2**31 - 1, temperature=1.0), OK),
        chat("min_p 2", chat_req(min_p=2)),
        chat("seed uint64 max", chat_req(seed=2**64 - 1, temperature=1.0), OK),
        chat("logit_bias id outside the vocabulary", chat_req(logit_bias={10**9: 1.0})),
        chat("logit_bias 500", chat_req(logit_bias={5: 500.0})),
        chat("top_logprobs 21", chat_req(logprobs=True, top_logprobs=21)),
        chat("five stop strings", chat_req(stop=["a", "b", "c", "d", "e"])),
        chat("unknown model", chat_req(model="gpt-4o"), frozenset({C.NOT_FOUND})),
        chat("the model's own id", chat_req(model="tiny-e2b"), OK),
        chat("a model alias", chat_req(model="m"), OK),
        Case("Complete (stream) with an unknown model", "chat",
             lambda env: raw_unary(env, "chat", CHAT, chat_pb2.CompleteRequest(chat=chat_req(model="x").chat),
                                   stream_out=True), frozenset({C.NOT_FOUND})),
    ]
    return cases




def schema_cases() -> list[Case]:
    """Fields a newer client might send, and enum values outside their enum: refused, never dropped."""
    inner = b"\xa0\x06\x01"  # field 100 = 1
    return [
        dec("unknown field in the setup", [b"\x0a" + bytes([len(inner)]) + inner]),
        dec("unknown top-level field", [setup().SerializeToString() + b"\xf8\x01\x05"]),
        dec("unknown field in SamplingParams", [b"\x0a\x05\x1a\x03" + inner]),
        # items { modality: IMAGE, <field 100>: 1 }
        enc("unknown field in a media item", b"\x0a" + bytes([len(inner) + 2]) + b"\x08\x01" + inner),
        chat("unknown field in ChatParams", chat_req().SerializeToString() + b"\x0a\x05\x12\x03" + inner),
        chat("unknown enum in a role inside a message", chat_req([chat_pb2.Message(role=7)])),
    ]


def all_cases() -> list[Case]:
    return decoder_cases() + encoder_cases() + chat_cases() + schema_cases()

"""The encoder as a real in-process gRPC server on the E2B-shaped checkpoint (both towers).

Covers: towers-only loading, long audio as consecutive blocks, the content
cache (hits do no tower work), in-flight sharing, batching across requests,
image budgets, output dtypes, queue bound, metrics, and a corpus of bad media
after which the service is still SERVING and answers the next good request.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math

import grpc
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from deploy.demo.media import shape_png, tone_wav
from encoder_service.config import EncoderConfig
from encoder_service.engine import EncoderEngine
from encoder_service.server import SERVICE_NAME as ENCODER
from encoder_service.server import start_encoder_server
from mmserve_core.runtime.grpc_runtime import set_serving
from mmserve_core.wire.stubs import encoder_pb2, encoder_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
IMAGE, AUDIO = tensor_pb2.MODALITY_IMAGE, tensor_pb2.MODALITY_AUDIO


async def _serve(ckpt, **cfg):
    engine = EncoderEngine(EncoderConfig(checkpoint=str(ckpt), port=0, **cfg))
    engine.start()
    server, port, health = await start_encoder_server(engine, "127.0.0.1:0")
    await engine.wait_ready()
    await set_serving(health, [ENCODER], True)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return engine, server, ch


@contextlib.asynccontextmanager
async def serving(ckpt, **cfg):
    """An encoder on ``ckpt`` over real gRPC: ``(engine, channel)``, stopped on exit."""
    engine, server, ch = await _serve(ckpt, **cfg)
    try:
        yield engine, ch
    finally:
        await ch.close()
        await server.stop(0)
        engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def enc(ckpt_e2b):
    async with serving(ckpt_e2b, max_audio_seconds=75.0) as e:
        yield e


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def enc_nocache(ckpt_e2b):
    async with serving(ckpt_e2b, cache_bytes=0, max_batch=8) as e:
        yield e


def _img(data: bytes, budget: int = 70) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=IMAGE, data=data, image_soft_tokens=budget)


def _aud(data: bytes) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=AUDIO, data=data)


async def _encode(ch, *items, dtype=tensor_pb2.DTYPE_UNSPECIFIED):
    """[(header, tensor bytes)] per item."""
    stub = encoder_pb2_grpc.EncoderServiceStub(ch)
    out: dict[int, list] = {}
    async for msg in stub.Encode(encoder_pb2.EncodeRequest(items=list(items), output_dtype=dtype)):
        if msg.WhichOneof("payload") == "header":
            out[msg.header.item_index] = [msg.header, b""]
        else:
            out[msg.chunk.item_index][1] += msg.chunk.data
    return [tuple(out[i]) for i in range(len(items))]


def _batches(engine, kind: str) -> float:
    """Forward passes run so far for ``kind`` (the batch-size histogram's count)."""
    for metric in engine.metrics.batch_size.collect():
        for s in metric.samples:
            if s.name.endswith("_count") and s.labels.get("modality") == kind:
                return s.value
    return 0.0


# ----------------------------------------------------------------------------- memory
async def test_only_tower_parameters_are_loaded(enc):
    engine, _ = enc
    names = engine.towers.parameter_names()
    prefixes = {n.split(".")[0] for n in names}
    assert prefixes == {"vision_tower", "embed_vision", "audio_tower", "embed_audio"}
    assert not any("language_model" in n or "embed_tokens" in n for n in names)
    assert engine.towers.param_bytes > 0


# ----------------------------------------------------------------------------- audio blocks
async def test_70s_clip_is_three_consecutive_blocks(enc):
    _, ch = enc
    (h, data), = await _encode(ch, _aud(tone_wav(70.0, 8000)))
    assert list(h.block_soft_tokens) == [750, 750, 250]
    assert h.soft_token_count == 1750 == h.tensor.shape[0]
    assert len(data) == 1750 * 64 * 2


async def test_clip_over_the_limit_names_both_durations(enc):
    _, ch = enc
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _encode(ch, _aud(tone_wav(80.0, 4000)))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "80.00 s" in ei.value.details() and "75 s" in ei.value.details()


async def test_short_clip_is_one_block_matching_its_duration(enc):
    _, ch = enc
    (h, _), = await _encode(ch, _aud(tone_wav(2.0, 44100)))
    assert list(h.block_soft_tokens) == [50] and h.soft_token_count == 50


async def test_every_clip_length_gets_exactly_ceil_ms_over_40_rows(enc):
    """Lengths where the tower's stride rounding gives one row too few (mlx-vlm then
    scatters too few rows) and clips shorter than one frame still get ceil(ms/40)."""
    _, ch = enc
    lengths = [1, 149, 667, 741, 1300, 11201, 16000 * 29 + 7]
    items = [_aud(_wav((0.1 * np.sin(np.arange(n) / 7)).astype(np.float32), 16000)) for n in lengths]
    out = await _encode(ch, *items)
    assert [h.soft_token_count for h, _ in out] == [math.ceil(n / 640) for n in lengths]  # 40 ms = 640 samples
    assert all(len(data) == h.soft_token_count * 64 * 2 for h, data in out)


# ----------------------------------------------------------------------------- cache
async def test_cache_hit_does_no_tower_work_and_returns_same_bytes(enc):
    engine, ch = enc
    png = shape_png("green", "circle", (120, 90))
    (h1, d1), = await _encode(ch, _img(png))
    before = _batches(engine, "image")
    (h2, d2), = await _encode(ch, _img(png))
    assert h2.cache_hit and not h1.cache_hit
    assert _batches(engine, "image") == before
    assert (h1.content_hash, d1) == (h2.content_hash, d2)
    # the same picture in another container decodes to the same pixels: same content key
    bmp = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(bmp, "BMP")
    (h3, d3), = await _encode(ch, _img(bmp.getvalue()))
    assert h3.cache_hit and h3.content_hash == h1.content_hash and d3 == d1
    assert _batches(engine, "image") == before


async def test_hash_depends_on_budget_and_dtype_gets_its_own_entry(enc):
    _, ch = enc
    png = shape_png("red", "square", (100, 100))
    (a, _), = await _encode(ch, _img(png, 70))
    (b, _), = await _encode(ch, _img(png, 140))
    assert a.content_hash != b.content_hash and a.soft_token_count < b.soft_token_count
    (c, data32), = await _encode(ch, _img(png, 70), dtype=tensor_pb2.DTYPE_FLOAT32)
    assert not c.cache_hit and c.content_hash == a.content_hash
    assert c.tensor.dtype == tensor_pb2.DTYPE_FLOAT32 and len(data32) == c.soft_token_count * 64 * 4
    (d, data16), = await _encode(ch, _img(png, 70), dtype=tensor_pb2.DTYPE_FLOAT16)
    assert np.allclose(np.frombuffer(data16, np.float16), np.frombuffer(data32, np.float32), atol=2e-2)


async def test_concurrent_identical_items_share_one_computation(enc_nocache):
    engine, ch = enc_nocache
    png = shape_png("blue", "circle", (80, 80))
    before = _batches(engine, "image")
    results = await asyncio.gather(*(_encode(ch, _img(png)) for _ in range(3)), _encode(ch, _img(png), _img(png)))
    datas = {r[1] for res in results for r in res}
    assert len(datas) == 1
    assert _batches(engine, "image") - before == 1


# ----------------------------------------------------------------------------- batching
async def test_concurrent_requests_batch_and_match_unbatched(enc_nocache):
    engine, ch = enc_nocache
    pngs = [shape_png(c, "square", (96, 96)) for c in ("red", "green", "blue", "yellow", "purple")]
    alone = [(await _encode(ch, _img(p)))[0][1] for p in pngs]
    before = _batches(engine, "image")
    together = await asyncio.gather(*(_encode(ch, _img(p)) for p in pngs))
    passes = _batches(engine, "image") - before
    assert passes < len(pngs)  # at least two requests shared a forward pass
    for a, (t,) in zip(alone, together):
        x = np.frombuffer(a, np.uint16).astype(np.uint32) << 16
        y = np.frombuffer(t[1], np.uint16).astype(np.uint32) << 16
        assert np.allclose(x.view(np.float32), y.view(np.float32), atol=3e-2, rtol=3e-2)


async def test_audio_blocks_of_one_bucket_batch(enc_nocache):
    engine, ch = enc_nocache
    before = _batches(engine, "audio")
    (h, _), = await _encode(ch, _aud(tone_wav(64.0, 4000, freq=300)))  # 30 + 30 + 4 s
    assert list(h.block_soft_tokens) == [750, 750, 100]
    assert _batches(engine, "audio") - before == 2  # the two full blocks share one pass


async def test_queue_bound_is_resource_exhausted(ckpt_e2b):
    engine, server, ch = await _serve(ckpt_e2b, max_pending=2, cache_bytes=0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _encode(ch, *[_img(shape_png(c, "circle", (64, 64))) for c in ("red", "green", "blue")])
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in ei.value.details()
        (h, _), = await _encode(ch, _img(shape_png("red", "circle", (64, 64))))
        assert h.soft_token_count > 0
    finally:
        await ch.close()
        await server.stop(0)
        engine.stop()


async def test_first_item_streams_while_the_next_computes(enc_nocache):
    """Item 0 (a short clip) is sent while item 1 (a 280-token image, ~1 s of tower work on
    CPU) is still in the towers: the header of item 0 arrives while item 1 is in flight."""
    engine, ch = enc_nocache
    stub = encoder_pb2_grpc.EncoderServiceStub(ch)
    req = encoder_pb2.EncodeRequest(items=[_aud(tone_wav(0.5, 16000, freq=321)),
                                           _img(shape_png("orange", "circle", (64, 64)), 280)])
    seen = []
    async for msg in stub.Encode(req):
        if msg.WhichOneof("payload") == "header":
            seen.append((msg.header.item_index, len(engine._inflight)))
    assert seen == [(0, 1), (1, 0)]


# ----------------------------------------------------------------------------- info + metrics
async def test_info_reports_blocks_and_budgets(enc):
    _, ch = enc
    info = await encoder_pb2_grpc.EncoderServiceStub(ch).GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest())
    assert list(info.image_soft_token_budgets) == [70, 140, 280, 560, 1120]
    assert info.default_image_soft_tokens == 280 and info.audio_block_seconds == 30.0
    assert info.max_audio_seconds == 75.0 and info.audio_sample_rate == 16000


async def test_metrics_count_outcomes_cache_and_batches(enc):
    engine, ch = enc
    png = shape_png("white", "circle", (50, 50))
    await _encode(ch, _img(png))
    await _encode(ch, _img(png))
    with pytest.raises(grpc.aio.AioRpcError):
        await _encode(ch, _img(b"junk"))
    text = engine.metrics.text()
    for series in ('mmserve_encoder_requests_total{outcome="OK"}',
                   'mmserve_encoder_requests_total{outcome="INVALID_ARGUMENT"}',
                   "mmserve_encoder_cache_hits_total", "mmserve_encoder_cache_bytes",
                   'mmserve_encoder_batch_size_count{modality="image"}',
                   'mmserve_encoder_item_seconds_bucket{le="0.5",modality="image"}',
                   "mmserve_encoder_queue_depth", "mmserve_encoder_embedding_bytes_total"):
        assert series in text, series


# ----------------------------------------------------------------------------- bad media
def _wav(x: np.ndarray, rate: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


_GOOD_WAV = tone_wav(1.0, 16000)
_NAN = np.full(1600, np.nan, np.float32)
_TIFF = io.BytesIO()
Image.new("RGB", (8, 8)).save(_TIFF, "TIFF")

# (name, item, expected status, a phrase the message must contain)
BAD = [
    ("zero-byte image", _img(b""), "INVALID_ARGUMENT", "empty"),
    ("zero-byte audio", _aud(b""), "INVALID_ARGUMENT", "empty"),
    ("random bytes as image", _img(np.random.default_rng(1).bytes(4096)), "INVALID_ARGUMENT", "not a decodable"),
    ("random bytes as audio", _aud(np.random.default_rng(2).bytes(4096)), "INVALID_ARGUMENT", "not decodable"),
    ("truncated PNG", _img(shape_png()[:300]), "INVALID_ARGUMENT", "PNG"),
    ("truncated JPEG", _img(shape_png(fmt="JPEG")[:400]), "INVALID_ARGUMENT", "image"),
    ("truncated WAV", _aud(_GOOD_WAV[: len(_GOOD_WAV) // 2]), "INVALID_ARGUMENT", "truncated"),
    ("truncated FLAC", _aud(tone_wav(2.0, 16000, fmt="FLAC")[:3000]), "INVALID_ARGUMENT", "FLAC"),
    ("WAV sent as image", _img(_GOOD_WAV), "INVALID_ARGUMENT", "not a decodable"),
    ("PNG sent as audio", _aud(shape_png()), "INVALID_ARGUMENT", "not decodable"),
    ("TIFF (unsupported)", _img(_TIFF.getvalue()), "INVALID_ARGUMENT", "unsupported image format TIFF"),
    ("AIFF (unsupported)", _aud(tone_wav(0.5, 16000, fmt="AIFF")), "INVALID_ARGUMENT", "AIFF"),
    ("decompression bomb", _img(_png(Image.new("L", (10000, 6000)))), "INVALID_ARGUMENT", "over the limit"),
    ("0-sample audio", _aud(_wav(np.zeros(0, np.float32), 16000)), "INVALID_ARGUMENT", "no samples"),
    ("NaN samples", _aud(_wav(_NAN, 16000)), "INVALID_ARGUMENT", "NaN"),
    ("infinite samples", _aud(_wav(np.full(1600, np.inf, np.float32), 16000)), "INVALID_ARGUMENT", "infinite"),
    ("clip over the limit", _aud(tone_wav(90.0, 2000, freq=200)), "INVALID_ARGUMENT", "90.00 s"),
    ("bad image budget", _img(shape_png(), 100), "INVALID_ARGUMENT", "image_soft_tokens 100"),
    ("budget on audio", encoder_pb2.MediaItem(modality=AUDIO, data=_GOOD_WAV, image_soft_tokens=70),
     "INVALID_ARGUMENT", "images only"),
    ("modality unspecified", encoder_pb2.MediaItem(data=shape_png()), "INVALID_ARGUMENT", "modality"),
    ("header-only WAV", _aud(_GOOD_WAV[:44]), "INVALID_ARGUMENT", "truncated"),
    ("GIF header only", _img(b"GIF89a\x10\x00\x10\x00"), "INVALID_ARGUMENT", "image"),
]

# Edge cases that are valid media: they must be *served* correctly, not refused.
EDGE_OK = [
    ("1x1 image", _img(_png(Image.new("RGB", (1, 1), (9, 9, 9))))),
    ("100000x1 image", _img(_png(Image.new("RGB", (100000, 1), (9, 9, 9))))),
    ("8-channel audio", _aud(_wav(np.tile(np.sin(np.arange(8000) / 9)[:, None], (1, 8)).astype(np.float32), 16000))),
    ("192 kHz audio", _aud(_wav(np.sin(np.arange(96000) / 30).astype(np.float32), 192000))),
    ("one-sample audio", _aud(_wav(np.array([0.1], np.float32), 16000))),
]


@pytest.mark.parametrize("name,item,status,phrase", BAD, ids=[b[0] for b in BAD])
async def test_bad_media_is_refused_and_service_stays_up(enc, name, item, status, phrase):
    engine, ch = enc
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _encode(ch, _img(shape_png("red", "circle", (40, 40))), item)  # a good item first: all-or-nothing
    assert ei.value.code().name == status, ei.value.details()
    assert phrase in ei.value.details()
    assert ei.value.details().startswith("items[1]") or status != "INVALID_ARGUMENT" or "modality" in phrase
    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=ENCODER))
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    (h, _), = await _encode(ch, _aud(_GOOD_WAV))
    assert h.soft_token_count == 25


@pytest.mark.parametrize("name,item", EDGE_OK, ids=[e[0] for e in EDGE_OK])
async def test_edge_case_media_is_served(enc, name, item):
    _, ch = enc
    (h, data), = await _encode(ch, item)
    assert h.soft_token_count > 0 and len(data) == h.soft_token_count * 64 * 2
    assert sum(h.block_soft_tokens) == h.soft_token_count


def test_bad_media_corpus_is_large_enough():
    assert len(BAD) + len(EDGE_OK) >= 20 and len(BAD) >= 20

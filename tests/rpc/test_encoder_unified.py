"""The encoder on the 12B-unified-shaped checkpoint: no towers, the patch and sample embedders only.

Covers what the unified model does differently from the tower checkpoints: only
``vision_embedder`` / ``embed_vision`` / ``embed_audio`` are loaded; an image's rows are its real
48-pixel patches (not the padded budget), equal to mlx-vlm's own ``get_image_features`` even when
images of different sizes share one pass; audio is a row per 640 samples, long clips in 30 s blocks.
"""

from __future__ import annotations

import io
import math

import mlx.core as mx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from deploy.demo.media import shape_png, tone_wav
from mmserve_core.wire.stubs import tensor_pb2
from tests.rpc.test_encoder import _aud, _encode, _img, _wav, serving

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def enc(ckpt_unified):
    async with serving(ckpt_unified, max_audio_seconds=75.0) as e:
        yield e


@pytest.fixture(scope="module")
def reference(ckpt_unified):
    from mlx_vlm.utils import load_model

    return load_model(ckpt_unified)


async def test_only_the_embedders_are_loaded(enc):
    engine, _ = enc
    names = engine.towers.parameter_names()
    assert {n.split(".")[0] for n in names} == {"vision_embedder", "embed_vision", "embed_audio"}
    assert not any("language_model" in n or "embed_tokens" in n for n in names)
    assert engine.modalities == ["image", "audio", "video"]


async def test_images_of_different_sizes_in_one_pass_equal_mlx_vlm(enc, reference):
    """Rows = the image's real patches (a 200x120 picture at budget 280 has 252), each image's rows as
    mlx-vlm's ``get_image_features`` gives them for that image alone."""
    engine, ch = enc
    pics = [shape_png("red", "circle", (200, 120)), shape_png("blue", "square", (64, 64))]
    got = await _encode(ch, _img(pics[0], 280), _img(pics[1], 280), dtype=tensor_pb2.DTYPE_FLOAT32)
    for (h, data), png in zip(got, pics):
        inp, n = engine.towers.preprocess_image(Image.open(io.BytesIO(png)).convert("RGB"), 280)
        ref = np.array(reference.get_image_features(mx.array(inp.pixels), mx.array(inp.positions)).astype(mx.float32))
        assert h.soft_token_count == n == ref.shape[0] < 280
        assert np.array_equal(np.frombuffer(data, np.float32).reshape(n, -1), ref)


async def test_audio_rows_are_one_per_640_samples_and_equal_mlx_vlm(enc, reference):
    engine, ch = enc
    lengths = [1, 639, 640, 641, 16000 * 2 + 100]
    waves = [(0.1 * np.sin(np.arange(n) / 7)).astype(np.float32) for n in lengths]
    got = await _encode(ch, *(_aud(_wav(w, 16000)) for w in waves), dtype=tensor_pb2.DTYPE_FLOAT32)
    for (h, data), w in zip(got, waves):
        assert h.soft_token_count == math.ceil(w.size / 640)
        f = engine.towers.audio_features(w)  # the WAV holds these float32 samples exactly
        ref = np.array(reference.get_audio_features(mx.array(f.features[None]), mx.array(f.mask[None]))
                       .astype(mx.float32))
        assert np.array_equal(np.frombuffer(data, np.float32).reshape(h.soft_token_count, -1), ref)


async def test_70s_clip_is_three_consecutive_blocks(enc):
    _, ch = enc
    (h, _), = await _encode(ch, _aud(tone_wav(70.0, 8000)))
    assert list(h.block_soft_tokens) == [750, 750, 250] and h.soft_token_count == 1750


async def test_a_resend_is_a_cache_hit(enc):
    _, ch = enc
    png = shape_png("green", "triangle", (96, 160))
    (first, a), = await _encode(ch, _img(png, 140))
    (again, b), = await _encode(ch, _img(png, 140))
    assert not first.cache_hit and again.cache_hit and a == b

"""Quantized checkpoints (4- and 8-bit, written by ``mlx_vlm.convert``): each service holds only its half.

The loaded parameter bytes are compared with the safetensors headers: the
decoder holds exactly the ``language_model.*`` tensors, the encoder exactly
the tower and projector tensors — nothing of the other half.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest
import pytest_asyncio
from mlx.utils import tree_flatten

from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderEngine
from deploy.demo.media import shape_png, tone_wav
from encoder_service.config import EncoderConfig
from encoder_service.engine import EncoderEngine
from mmserve_core.wire import types as T

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOWERS = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")


def _bytes_by_top(ckpt: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for f in ckpt.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                top = name.split(".")[0]
                sizes[top] = sizes.get(top, 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


@pytest.fixture(scope="module", params=[4, 8])
def quantized(request, ckpt_e2b, tmp_path_factory) -> Path:
    from mlx_vlm import convert

    out = tmp_path_factory.mktemp("quant") / f"q{request.param}"
    convert(str(ckpt_e2b), str(out), quantize=True, q_bits=request.param, q_group_size=32)
    for f in ckpt_e2b.iterdir():  # convert writes weights + config; the tokenizer comes along as on the Hub
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == request.param
    return out


async def _serving(engine):
    """An engine started and ready; the fixture stops it."""
    engine.start()
    await engine.wait_ready()
    return engine


@pytest_asyncio.fixture(loop_scope="session")
async def decoder(quantized):
    e = await _serving(DecoderEngine(DecoderConfig(checkpoint=str(quantized), port=0)))
    yield e
    e.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def encoder(quantized):
    e = await _serving(EncoderEngine(EncoderConfig(checkpoint=str(quantized), port=0)))
    yield e
    e.stop()


async def test_decoder_holds_exactly_the_quantized_lm(decoder, quantized):
    runner = decoder.runner
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in runner.lm.named_modules())
    assert runner.param_bytes == _bytes_by_top(quantized)["language_model"]
    ids = [2, 105, 10, 11, 12, 106, 105, 11]
    s = T.SamplingParams(temperature=0.0, max_tokens=6, logit_bias={t: -100.0 for t in decoder.eos_ids})
    resolved = decoder.validate(ids, [], s)
    toks = [t async for ev in decoder.generate(ids, [], resolved, []) if isinstance(ev, T.TokenEvent)
            for t in ev.token_ids]
    assert len(toks) == 6


async def test_encoder_holds_exactly_the_quantized_towers(encoder, quantized):
    towers = encoder.towers
    sizes = _bytes_by_top(quantized)
    assert towers.param_bytes == sum(sizes[k] for k in TOWERS if k in sizes)
    names = towers.parameter_names()
    assert names and all(n.split(".")[0] in TOWERS for n in names)
    # (mlx_vlm.convert keeps towers in full precision, as the mlx-community 4-bit Gemma 4s do)
    futs = await encoder.encode([T.MediaInput(T.IMAGE, shape_png(size=(60, 40)), image_soft_tokens=70),
                                 T.MediaInput(T.AUDIO, tone_wav(1.0, 16000))], None)
    img, aud = [await f for f in futs]
    assert aud.soft_token_count == 25 and img.soft_token_count > 0
    rows = (img.tensor.to_numpy().astype(np.uint32) << 16).view(np.float32)
    assert np.isfinite(rows).all() and tree_flatten(towers.vision_tower.parameters())

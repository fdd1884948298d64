"""Shared fixtures: tiny checkpoints of several Gemma 4 shapes, services, sample media."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy.demo.media import shape_png, tone_wav
from deploy.processes import start_services
from mmserve_core.runtime.blas import optimized_library
from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

# The tests' requests call the model "m": every gateway they start (an OS process inheriting this
# environment) serves that alias beside the checkpoint's id; any other name is 404 model_not_found.
os.environ.setdefault("MMSERVE_GATEWAY_MODEL_ALIASES", "m")

# The services run MLX on an optimized BLAS when the machine has one (mmserve_core.runtime.blas).
# The parity tests compare them with mlx-vlm run in *this* process, and float sums in another order
# flip a random model's greedy argmax, so the services the tests start run on the BLAS this process
# runs on: the wheel's own unless pytest itself was started with the library preloaded.
# tests/e2e/test_blas.py starts services on the optimized BLAS explicitly and checks they give the
# same greedy tokens.
_lib = optimized_library()
if _lib is not None and _lib not in os.environ.get("LD_PRELOAD", ""):
    os.environ.setdefault("MMSERVE_BLAS", "reference")


@pytest.fixture(scope="session")
def ckpt_e2b(tmp_path_factory) -> Path:
    """E2B-shaped: per-layer inputs, KV sharing, vision + audio towers, bf16."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-e2b", variant="e2b")


@pytest.fixture(scope="session")
def ckpt_moe(tmp_path_factory) -> Path:
    """26B-A4B-shaped: MoE, bidirectional vision attention, no audio tower (f32: CPU gather_mm)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-moe", variant="moe", dtype="float32")


@pytest.fixture(scope="session")
def ckpt_dense(tmp_path_factory) -> Path:
    """31B-shaped: k_eq_v attention, bidirectional vision, no audio tower, bf16."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-dense", variant="dense")


@pytest.fixture(scope="session")
def ckpt_unified(tmp_path_factory) -> Path:
    """12B-unified-shaped: no towers (patch and sample embedders), k_eq_v attention, bidirectional vision."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-unified", variant="unified")


@pytest.fixture(scope="session")
def services_unified(ckpt_unified):
    with start_services(ckpt_unified) as svc:
        yield svc


@pytest.fixture(scope="session")
def services_e2b(ckpt_e2b):
    # a short total-audio limit so the over-limit test needs only a small upload
    with start_services(ckpt_e2b, encoder_args=["--max-audio-seconds", "75"]) as svc:
        yield svc


@pytest.fixture(scope="session")
def services_moe(ckpt_moe):
    with start_services(ckpt_moe) as svc:
        yield svc


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    (d / "red_circle.png").write_bytes(shape_png("red", "circle", (224, 224)))
    (d / "blue_square.jpg").write_bytes(shape_png("blue", "square", (320, 200), fmt="JPEG"))
    (d / "tone_2s.wav").write_bytes(tone_wav(2.0, 16000, 440.0))
    (d / "tone_0p7s.wav").write_bytes(tone_wav(0.7, 16000, 660.0))
    (d / "tone_1p3s.flac").write_bytes(tone_wav(1.3, 16000, 550.0, fmt="FLAC"))
    return d

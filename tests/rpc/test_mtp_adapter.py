"""The facts ``decoder_service.mtp_adapter`` relies on in mlx-vlm (fails loudly on an upgrade)."""

from __future__ import annotations

from importlib.metadata import version

import mlx.core as mx
import numpy as np
import pytest

from decoder_service import mtp_adapter
from decoder_service.model import LanguageModelRunner
from tests.tooling.tiny_checkpoint import write_tiny_checkpoint, write_tiny_drafter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    ckpt = write_tiny_checkpoint(root / "t", variant="e2b", dtype="float32")
    return LanguageModelRunner(ckpt), write_tiny_drafter(root / "d", ckpt)


def test_the_pinned_minor_version():
    assert version("mlx-vlm").startswith(mtp_adapter.TESTED_MINOR + "."), (
        "mlx-vlm changed minor version: recheck every fact in decoder_service/mtp_adapter.py, then bump TESTED_MINOR")


def test_the_drafter_and_the_targets_hooks(pair):
    runner, path = pair
    model, config = mtp_adapter.load(path)
    assert config.model_type in mtp_adapter.DRAFTER_TYPES
    mtp_adapter.bind(model, runner.lm)
    cache = runner.lm.make_cache()
    logits, hidden, shared = mtp_adapter.forward(runner.lm, mx.array([[2, 30, 31, 32, 33]]), cache)
    assert logits.shape[:2] == (1, 5) and hidden.shape == (1, 5, 64)
    assert set(shared) == {"sliding_attention", "full_attention"}
    assert all(k.shape[-2] == 5 for k, _ in shared.values())
    h = mtp_adapter.draft_hidden(runner.lm, hidden[:, -1:])
    drafts = mtp_adapter.draft(model, 40, h, shared, 5, 3)
    assert drafts.shape == (1, 3) and drafts.dtype in (mx.int32, mx.uint32)


def test_a_wrapped_window_trims_back_exactly(pair):
    """Fed 100 tokens (window 64), then 4 more that are rejected: the rolled-back cache equals
    one that never saw them, and the plain cache made from it continues identically."""
    runner, _ = pair
    lm = runner.lm
    ids = mx.array([[2, *range(20, 119)]])
    ref = lm.make_cache()
    lm(ids, cache=ref)
    cache = mtp_adapter.rollback_ready(lm.make_cache())
    lm(ids, cache=cache)
    lm(mx.array([[7, 8, 9, 10]]), cache=cache)
    mtp_adapter.trim(cache, 4)
    nxt = mx.array([[11]])
    a = lm(nxt, cache=ref).logits
    b = lm(nxt, cache=mtp_adapter.plain(cache)).logits
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    assert all(type(c).__name__ in ("KVCache", "RotatingKVCache") for c in mtp_adapter.plain(cache))

"""The three mlx-vlm internals the decoder's chunked media prefill reads (``decoder_service/mlx_vlm_masks.py``),
checked on a tiny bidirectional Gemma 4 checkpoint: if an mlx-vlm upgrade changes one, this fails by name —
before an image block is attended the wrong way."""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx_vlm
import numpy as np
import pytest
from mlx_vlm.models.gemma4.language import Gemma4TextModel

from decoder_service import mlx_vlm_masks
from decoder_service.model import LanguageModelRunner
from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

WINDOW = 64  # the tiny checkpoint's sliding window


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> LanguageModelRunner:
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("masks") / "dense", variant="dense", dtype="float32")
    r = LanguageModelRunner(ckpt)
    assert r.bidirectional_vision
    return r


def _types(n: int, blocks: list[tuple[int, int]]) -> mx.array:
    t = np.zeros((1, n), np.int32)
    for a, b in blocks:
        t[0, a:b] = 1
    return mx.array(t)


def test_the_installed_mlx_vlm_is_the_minor_the_adapter_was_checked_on():
    assert mlx_vlm.__version__.startswith(mlx_vlm_masks.TESTED_MINOR + "."), (
        f"mlx-vlm {mlx_vlm.__version__}: re-check decoder_service/mlx_vlm_masks.py's three facts and update "
        f"TESTED_MINOR and the pin in pyproject.toml")


def test_fact_1_the_text_model_builds_its_masks_through_self_make_masks(runner):
    params = list(inspect.signature(Gemma4TextModel._make_masks).parameters)
    assert params[:4] == ["self", "h", "cache", "mm_token_type_ids"], (
        f"Gemma4TextModel._make_masks{params}: mlx_vlm_masks fact 1 no longer holds")
    calls = []
    inner = runner.inner

    def spy(h, cache, mm_token_type_ids=None):
        calls.append((h.shape, mm_token_type_ids.shape))
        return type(inner)._make_masks(inner, h, cache, mm_token_type_ids)

    inner._make_masks = spy
    try:
        runner.lm(mx.array([[2, 105, 10]]), cache=runner.lm.make_cache(), mm_token_type_ids=_types(3, []))
    finally:
        del inner._make_masks
    assert calls == [((1, 3, 64), (1, 3))], (
        f"Gemma4TextModel.__call__ did not build its masks through self._make_masks ({calls}): "
        f"mlx_vlm_masks fact 1 no longer holds")
    assert "_make_masks" not in vars(inner)  # the override left no trace


@pytest.mark.parametrize("offset", [0, 40, 200])
def test_fact_2_masks_of_a_visual_chunk_end_with_the_chunks_own_keys(runner, offset):
    """At any cache offset, one boolean ``[.., N, K]`` array per layer, K = the keys the layer's
    cache returns (all earlier ones on full layers, up to window - 1 on sliding ones) + the chunk's N."""
    cache = runner.lm.make_cache()
    if offset:
        runner.lm(mx.array([[10] * offset]), cache=cache)
    n = 30
    h = mx.zeros((1, n, runner.hidden_size))
    masks = runner.inner._make_masks(h, cache, _types(n, [(5, 25)]))
    types = runner.config.text_config.layer_types
    assert len(masks) == len(types)
    for kind, m in zip(types, masks):
        keys = offset + n if kind == "full_attention" else min(offset, WINDOW - 1) + n
        assert isinstance(m, mx.array) and m.dtype == mx.bool_ and m.shape[-2:] == (n, keys), (
            f"{kind} mask {getattr(m, 'shape', m)} at offset {offset}: mlx_vlm_masks fact 2 no longer holds")


def test_fact_3_blocks_are_mlx_vlms_blocks(runner):
    t = np.array([[0, 1, 1, 0, 2, 2, 1, 0, 3, 3, 1, 0, 0, 1]], np.int32)
    ids = np.array(runner.inner._block_sequence_ids_for_mask(mx.array(t)))[0]
    theirs = [(int(np.flatnonzero(ids == g)[0]), int(np.flatnonzero(ids == g)[-1]) + 1)
              for g in sorted(set(ids.tolist()) - {-1})]
    assert mlx_vlm_masks.block_spans(t) == theirs == [(1, 3), (4, 7), (10, 11), (13, 14)], (
        "mlx-vlm's image blocks are no longer contiguous runs of image/video types: mlx_vlm_masks fact 3")


def test_the_overlay_at_offset_zero_is_mlx_vlms_own(runner):
    """With no cache offset mlx-vlm overlays the blocks itself; ours gives the very same masks."""
    n, t = 40, _types(40, [(3, 20), (25, 31)])
    h = mx.zeros((1, n, runner.hidden_size))
    theirs = runner.inner._make_masks(h, runner.lm.make_cache(), t)
    with mlx_vlm_masks.block_overlay(runner.inner, t):
        ours = runner.inner._make_masks(h, runner.lm.make_cache(), t)
    for a, b in zip(theirs, ours):
        assert np.array_equal(np.broadcast_to(np.array(a), np.array(b).shape), np.array(b))


def test_an_unexpected_mask_fails_loudly(runner, monkeypatch):
    monkeypatch.setattr(type(runner.inner), "_make_masks", lambda self, h, cache, tt=None: ["causal"] * 4)
    with pytest.raises(RuntimeError, match="fact 2 no longer holds"):
        with mlx_vlm_masks.block_overlay(runner.inner, _types(4, [(1, 3)])):
            runner.inner._make_masks(mx.zeros((1, 4, 64)), None, _types(4, [(1, 3)]))

"""A media prompt prefilled in chunks (``decoder_service/media_prefill.py``) ends where the whole-prompt
prefill ends: the same final logits, on every Gemma 4 input shape — bidirectional image blocks at a
non-zero cache offset (31B-like dense, 26B-A4B-like MoE), per-layer inputs (E-series), and a plain
causal dense model — for chunk widths that put boundaries before, at and after block edges.

Real tiny checkpoints in float32 (the decoder's own ``LanguageModelRunner``); no engine, no threads
but this one.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from decoder_service.media_prefill import MediaPrefill, chunk_end
from decoder_service.mlx_vlm_masks import block_spans
from decoder_service.model import LanguageModelRunner, SpanRows
from tests.tooling.tiny_checkpoint import IDS, write_tiny_checkpoint

IMG, BOI, EOI = IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"]
AUD, BOA, EOA = IDS["<|audio|>"], IDS["<|audio>"], IDS["<audio|>"]
SHAPES = {
    "dense-bidirectional": dict(variant="dense"),
    "moe-bidirectional": dict(variant="moe"),
    "e2b-ple": dict(variant="e2b"),
    "dense-causal": dict(variant="dense", overrides={"text_config": {"use_bidirectional_attention": None}}),
}


@pytest.fixture(scope="module")
def runners(tmp_path_factory) -> dict[str, LanguageModelRunner]:
    root = tmp_path_factory.mktemp("media-prefill")
    return {name: LanguageModelRunner(write_tiny_checkpoint(root / name, dtype="float32", **kw))
            for name, kw in SHAPES.items()}


def _media_prompt(rng, blocks: list[tuple[int, int]], hidden: int = 64) -> tuple[list[int], list[SpanRows]]:
    """Text, then for each ``(placeholder id, rows)`` a span of soft-token rows between its markers."""
    ids, spans = [2, 105], []
    for token, rows in blocks:
        ids += [int(x) for x in rng.integers(10, 240, int(rng.integers(3, 40)))]
        ids += [BOI if token == IMG else BOA]
        data = (rng.standard_normal((rows, hidden)) * 0.5).astype(np.float32)
        spans.append(SpanRows(len(ids), data, "float32", "image" if token == IMG else "audio"))
        ids += [token] * rows + [EOI if token == IMG else EOA]
    return ids + [106, 105, 11], spans


def _chunked(runner, ids, spans, width: int, *, cache=None, start: int = 0) -> tuple[mx.array, int]:
    """Final logits of the prompt prefilled ``width`` tokens a step as the scheduler runs it while
    others decode, and the number of chunks it took."""
    mp = MediaPrefill(runner)
    mp.add("row", ids, spans, cache if cache is not None else runner.lm.make_cache(), start)
    while True:
        res = mp.step(busy=True, tokens=width)
        assert not res.failed, res.failed
        if res.done:
            [(item, _, logits)] = res.done
            assert item == "row" and len(mp) == 0
            return logits, mp.last_chunks


def _close(got: mx.array, want: mx.array) -> None:
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert np.array_equal(np.isneginf(got), np.isneginf(want))  # the same ids suppressed
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-3, rtol=0)
    assert got.argmax() == want.argmax()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_chunked_media_prefill_ends_with_the_whole_prompts_logits(runners, shape):
    runner = runners[shape]
    rng = np.random.default_rng(3)
    # blocks smaller than, equal to and far larger than a chunk; the sliding window is 64 tokens
    blocks = [(IMG, 30), (IMG, 100), (IMG, 7), (IMG, 64), (IMG, 200)]
    if shape == "e2b-ple":
        blocks.insert(2, (AUD, 90))
    ids, spans = _media_prompt(rng, blocks)
    _, whole = runner.prefill(ids, spans)
    edges = sorted({e for b in block_spans(runner.prompt_features(ids, spans).types) for e in b})
    for width in (1, 16, 64, 100, edges[0], edges[1] - edges[0], 512):
        logits, chunks = _chunked(runner, ids, spans, width)
        assert chunks > 1, width
        _close(logits, whole)


def test_bidirectional_chunks_would_differ_without_the_block_overlay(runners, monkeypatch):
    """The check above has teeth: with mlx-vlm's own masks alone (no overlay past offset 0), the
    chunked logits of an image prompt on a bidirectional checkpoint are not the whole prompt's."""
    import contextlib

    import decoder_service.mlx_vlm_masks as masks

    runner = runners["dense-bidirectional"]
    ids, spans = _media_prompt(np.random.default_rng(3), [(IMG, 30), (IMG, 100)])
    _, whole = runner.prefill(ids, spans)
    monkeypatch.setattr(masks, "block_overlay", lambda inner, types: contextlib.nullcontext())
    logits, _ = _chunked(runner, ids, spans, 16)
    got, want = np.array(logits), np.array(whole)
    finite = np.isfinite(want)
    assert np.abs(got[finite] - want[finite]).max() > 1e-2


@pytest.mark.parametrize("shape", ["dense-bidirectional", "e2b-ple"])
def test_chunked_media_prefill_from_a_cached_prefix(runners, shape):
    """A prefix-cache hit (``start``: the cache already holds the prompt's head, every image in it)
    is continued in chunks to the same logits."""
    runner = runners[shape]
    rng = np.random.default_rng(5)
    head, head_spans = _media_prompt(rng, [(IMG, 40), (IMG, 25)])
    head = head[:-3]
    tail, tail_spans = _media_prompt(rng, [] if runner.bidirectional_vision else [(AUD, 60)])
    tail = tail[:2] + [int(x) for x in rng.integers(10, 240, 40)] + tail[2:]  # text after the hit
    tail_spans = [SpanRows(s.offset + 40, s.array, s.dtype, s.modality) for s in tail_spans]
    ids = head + tail[2:]
    spans = head_spans + [SpanRows(s.offset - 2 + len(head), s.array, s.dtype, s.modality) for s in tail_spans]
    _, whole = runner.prefill(ids, spans)
    cache, _ = runner.prefill(head, head_spans)  # holds ids[:len(head)]
    logits, chunks = _chunked(runner, ids, spans, 16, cache=cache, start=len(head))
    assert chunks > 1
    _close(logits, whole)


def test_idle_step_is_mlx_vlms_exact_prefill(runners):
    """With nothing decoding, a prompt not yet begun takes ``LanguageModelRunner.prefill`` whole —
    bit for bit the logits mlx-vlm's path gives (single-request parity)."""
    runner = runners["dense-bidirectional"]
    ids, spans = _media_prompt(np.random.default_rng(9), [(IMG, 50), (IMG, 80)])
    _, whole = runner.prefill(ids, spans)
    mp = MediaPrefill(runner)
    mp.add("row", ids, spans, runner.lm.make_cache(), 0)
    res = mp.step(busy=False, tokens=16)
    assert res.spent == len(ids) and mp.last_chunks == 1
    assert np.array_equal(np.array(res.done[0][2]), np.array(whole))


def test_a_chunk_never_splits_an_image_block():
    blocks = [(10, 20), (30, 330)]
    assert chunk_end(0, 400, 15, blocks) == 10      # would cut block 1: ends before it
    assert chunk_end(10, 400, 5, blocks) == 20      # starts a block: the whole block, past the width
    assert chunk_end(20, 400, 50, blocks) == 30     # ends before block 2
    assert chunk_end(30, 400, 16, blocks) == 330    # a block over the budget is one chunk of its own
    assert chunk_end(330, 400, 512, blocks) == 400
    assert chunk_end(0, 400, 10, blocks) == 10 and chunk_end(0, 400, 20, blocks) == 20  # at an edge


def test_a_failed_chunk_is_that_prompts_problem(runners, monkeypatch):
    runner = runners["e2b-ple"]
    ids, spans = _media_prompt(np.random.default_rng(1), [(IMG, 20)])
    mp = MediaPrefill(runner)
    mp.add("bad", ids, spans, runner.lm.make_cache(), 0)
    mp.add("good", ids, spans, runner.lm.make_cache(), 0)

    def broken(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(runner, "prefill_chunk", broken)
    res = mp.step(busy=True, tokens=16)
    assert [i for i, _ in res.failed] == ["bad"] and len(mp) == 1 and "injected" in str(res.failed[0][1])
    monkeypatch.undo()
    while not (res := mp.step(busy=True, tokens=16)).done:
        pass
    assert res.done[0][0] == "good" and len(mp) == 0

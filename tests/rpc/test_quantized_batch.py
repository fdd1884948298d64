"""``--kv-bits`` on the running batch: mlx-vlm's quantized caches joined into mlx-lm's batch
(``decoder_service.quantized_kv``), and the decoder serving with them.

Greedy agreement with full precision is printed, not asserted (a random-weight model has near-ties
everywhere; ``bench_drafting`` / ``bench_decoder`` report it on the demo model); what is asserted:
the batch holds the quantized classes, a step on them computes what the dequantized KV computes,
rows leave and join exactly, and requests of every kind complete with their lengths."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest
import pytest_asyncio

from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderEngine
from decoder_service.model import LanguageModelRunner
from decoder_service.quantized_kv import BatchQuantizedKV, RowQuantizedKV, quantizable_layers, quantize
from mmserve_core.wire import types as T
from mmserve_core.wire.tensors import RawTensor
from tests.tooling.tiny_checkpoint import IDS, write_tiny_checkpoint, write_tiny_drafter

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("qkv")
    ckpt = write_tiny_checkpoint(root / "dense", variant="dense", dtype="float32")
    return ckpt, write_tiny_drafter(root / "drafter", ckpt)


def _dequantized_step(runner, caches, tokens):
    """The same batched step on the rows' KV dequantized (what the quantized step must compute)."""
    from mlx_lm.generate import _merge_caches

    from decoder_service.prefix_cache import _dequantized

    batch = _merge_caches([[_dequantized(c) for c in row] for row in caches])
    return np.array(runner.logits_model()(mx.array([[t] for t in tokens]), cache=batch)[:, -1])


def test_quantized_rows_merge_step_and_extract_exactly(dense):
    from mlx_lm.generate import _merge_caches

    runner = LanguageModelRunner(dense[0])
    layers = quantizable_layers(runner.lm, drafter=False)
    assert layers == {1, 3}  # the 31B shape: every full-attention layer; with a drafter not the last
    assert quantizable_layers(runner.lm, drafter=True) == {1}
    prompts = [[2, *range(20, 20 + n)] for n in (30, 70, 9)]
    rows = [quantize(runner.prefill(p, [])[0], layers, 8) for p in prompts]
    assert all(isinstance(r[i], RowQuantizedKV) for r in rows for i in layers)
    batch = _merge_caches(rows)
    assert isinstance(batch[1], BatchQuantizedKV) and batch[1].size() == max(map(len, prompts))
    want = _dequantized_step(runner, rows, [5, 6, 7])
    got = np.array(runner.logits_model()(mx.array([[5], [6], [7]]), cache=batch)[:, -1])
    finite = np.isfinite(want[0])
    np.testing.assert_allclose(got[:, finite], want[:, finite], atol=2e-3)
    for i, p in enumerate(prompts):  # each row back out: its own KV, one step longer
        row = batch[1].extract(i)
        assert isinstance(row, RowQuantizedKV) and row.offset == len(p) + 1
        mine = rows[i][1]
        np.testing.assert_array_equal(np.array(row.keys[0][..., : len(p), :]), np.array(mine.keys[0][..., : len(p), :]))


def _span(rng, offset, rows):
    data = (rng.standard_normal((rows, 64)) * 0.5).astype(np.float32)
    return T.SpanEmbedding(T.Span(offset, rows, T.IMAGE), RawTensor(data.tobytes(), "float32", (rows, 64)))


async def _run(engine, ids, spans, **kw):
    s = T.SamplingParams(**{"temperature": 0.0, "max_tokens": 48, **kw})
    resolved = await engine.validate_async(ids, [(sp.span, sp.tensor.dtype, sp.tensor.shape) for sp in spans], s)
    toks, done = [], None
    async for ev in engine.generate(ids, spans, resolved, s.stop_token_ids):
        if isinstance(ev, T.TokenEvent):
            toks += ev.token_ids
        else:
            done = ev
    return toks, done


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engines(dense):
    out = {}
    for name, kw in (("full", {}), ("q8", {"kv_bits": 8}), ("q8+draft", {"kv_bits": 8, "draft_model": str(dense[1])})):
        e = DecoderEngine(DecoderConfig(checkpoint=str(dense[0]), port=0, stream_interval_ms=0, max_active=8, **kw))
        e.start()
        await e.wait_ready()
        out[name] = e
    yield out
    for e in out.values():
        e.stop()


async def test_the_decoder_serves_batches_and_solo_streams_on_quantized_kv(engines):
    rng = np.random.default_rng(3)
    prompts = []
    for i in range(6):
        ids = [2, 105] + [int(x) for x in rng.integers(10, 240, int(rng.integers(20, 200)))]
        spans = []
        if i % 2:
            ids.append(IDS["<|image>"])
            spans = [_span(rng, len(ids), 12)]
            ids += [IDS["<|image|>"]] * 12 + [IDS["<image|>"]]
        prompts.append((ids + [106, 105, 11], spans))
    results = {}
    for name, engine in engines.items():
        no_eos = {t: -100.0 for t in engine.eos_ids}
        alone = [await _run(engine, ids, spans, logit_bias=no_eos) for ids, spans in prompts[:2]]
        together = await asyncio.gather(*(_run(engine, ids, spans, logit_bias=no_eos) for ids, spans in prompts))
        for toks, done in [*alone, *together]:
            assert len(toks) == 48 and done.completion_tokens == 48 and done.finish_reason == "length"
        results[name] = [t for t, _ in together]
    for name in ("q8", "q8+draft"):
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                 for x, y in zip(results[name], results["full"])]
        print(f"{name}: greedy tokens equal to full precision before the first difference: {agree}")
    q8, draft = engines["q8"].scheduler, engines["q8+draft"].scheduler
    assert q8._quant_layers == {1, 3} and draft._quant_layers == {1}


async def test_a_quantized_conversation_continues_from_the_prefix_cache(engines):
    engine = engines["q8"]
    rng = np.random.default_rng(8)
    ids = [2, 105] + [int(x) for x in rng.integers(10, 240, 120)] + [106, 105, 11]
    no_eos = {t: -100.0 for t in engine.eos_ids}
    first, _ = await _run(engine, ids, [], logit_bias=no_eos)
    turn2 = ids + first + [106, 105, 12, 106, 105]
    a, done = await _run(engine, turn2, [], logit_bias=no_eos, max_tokens=16)
    assert done.cached_tokens > len(ids) and len(a) == 16

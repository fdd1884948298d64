"""Prefix cache: turn 2 reuses turn 1's KV (same tokens as without it); images never mix.

Float32 checkpoints, so "same tokens as without the cache" compares exact
computations rather than bf16 rounding of two equally valid summation orders.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio

from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderEngine
from mmserve_core.wire import types as T
from mmserve_core.wire.tensors import RawTensor
from tests.tooling.tiny_checkpoint import IDS, write_tiny_checkpoint

pytestmark = pytest.mark.asyncio(loop_scope="session")
IMG, BOI, EOI = IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"]
TURN_END, TURN_OPEN = IDS["<turn|>"], IDS["<|turn>"]


async def _engine(ckpt, prefix_bytes):
    e = DecoderEngine(DecoderConfig(checkpoint=str(ckpt), port=0, stream_interval_ms=0,
                                    prefix_cache_bytes=prefix_bytes))
    e.start()
    await e.wait_ready()
    return e


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["e2b", "dense"])
async def pair(request, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("pc") / request.param, variant=request.param,
                                 dtype="float32")
    cached, plain = await _engine(ckpt, 1 << 30), await _engine(ckpt, 0)
    yield cached, plain
    cached.stop()
    plain.stop()


def _image(seed: int, rows: int = 12) -> T.SpanEmbedding:
    data = (np.random.default_rng(seed).standard_normal((rows, 64)) * 0.5).astype(np.float32)
    return RawTensor(data.tobytes(), "float32", (rows, 64))


def _with_image(prefix: list[int], tensor: RawTensor, suffix: list[int]):
    rows = tensor.shape[0]
    ids = prefix + [BOI] + [IMG] * rows + [EOI] + suffix
    return ids, [T.SpanEmbedding(T.Span(len(prefix) + 1, rows, T.IMAGE), tensor)]


async def _run(engine, ids, spans=(), max_tokens=12, point=0):
    """Greedy, EOS biased off: ``(tokens, Completion)``; ``point``: the setup's ``cache_point``."""
    s = T.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                         logit_bias={t: -100.0 for t in engine.eos_ids})
    spans = list(spans)
    resolved = engine.validate(ids, [(sp.span, sp.tensor.dtype, sp.tensor.shape) for sp in spans], s)
    toks, done = [], None
    async for ev in engine.generate(ids, spans, resolved, [], cache_point=point):
        if isinstance(ev, T.TokenEvent):
            toks += ev.token_ids
        else:
            done = ev
    return toks, done


async def test_second_turn_reuses_the_first(pair):
    cached, plain = pair
    turn1, spans = _with_image([2, TURN_OPEN, 30, 31, 32], _image(1), [40, 41, TURN_END, TURN_OPEN, 60])
    reply, d1 = await _run(cached, turn1, spans)
    assert d1.cached_tokens == 0
    turn2 = turn1 + reply + [TURN_END, TURN_OPEN, 33, 34, 35, TURN_END, TURN_OPEN, 60]
    got, d2 = await _run(cached, turn2, spans)
    # everything turn 1 computed is reused: its prompt and its whole reply
    assert d2.cached_tokens == len(turn1) + len(reply)
    want, d3 = await _run(plain, turn2, spans)
    assert got == want and d3.cached_tokens == 0


async def test_same_placeholders_other_image_never_hits_past_the_image(pair):
    cached, _ = pair
    prefix = [2, TURN_OPEN, 50, 51]
    a_ids, a_spans = _with_image(prefix, _image(7), [52, TURN_END, TURN_OPEN, 60])
    await _run(cached, a_ids, a_spans)
    b_ids, b_spans = _with_image(prefix, _image(8), [52, TURN_END, TURN_OPEN, 60])
    assert b_ids == a_ids  # identical token ids, different pixels
    _, db = await _run(cached, b_ids, b_spans)
    assert db.cached_tokens <= len(prefix) + 1  # at most up to <|image>, never into the rows
    c_ids, c_spans = _with_image(prefix, _image(7), [52, 53, TURN_END, TURN_OPEN, 60])
    _, dc = await _run(cached, c_ids, c_spans)
    assert dc.cached_tokens >= len(prefix) + 1 + 12 + 1  # same image: the whole block reused


async def test_hit_tokens_are_counted_in_metrics(pair):
    cached, _ = pair
    ids = [2, TURN_OPEN, 70, 71, 72, 73, TURN_END, TURN_OPEN, 60]
    await _run(cached, ids, [])
    before = _counter(cached, "mmserve_decoder_prefix_cache_hit_tokens")
    _, d = await _run(cached, ids, [])
    assert d.cached_tokens == len(ids) - 1
    assert _counter(cached, "mmserve_decoder_prefix_cache_hit_tokens") - before == len(ids) - 1


def _counter(engine, name: str) -> float:
    for metric in engine.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name + "_total":
                return s.value
    return 0.0


async def test_new_image_in_the_second_turn(pair):
    """E2B (causal everywhere) reuses turn 1 and computes the new image after it; the
    31B shape attends bidirectionally inside image blocks, which Gemma 4's mask code
    only applies without a KV prefix — so there the turn is computed whole.  Either
    way the tokens equal a run without the cache."""
    cached, plain = pair
    turn1 = [2, TURN_OPEN, 80, 81, 82, TURN_END, TURN_OPEN, 60]
    reply, _ = await _run(cached, turn1, [])
    turn2, spans = _with_image(turn1 + reply + [TURN_END, TURN_OPEN, 83], _image(42), [84, TURN_END, TURN_OPEN, 60])
    got, d = await _run(cached, turn2, spans)
    want, _ = await _run(plain, turn2, spans)
    assert got == want
    if cached.runner.bidirectional_vision:
        assert d.cached_tokens == 0
    else:
        assert d.cached_tokens == len(turn1) + len(reply)


async def test_stored_kv_is_compact_so_the_byte_bound_holds(ckpt_e2b):
    """Kept caches must not pin the batch's whole KV buffer (a view would): MLX's active
    memory grows by about what the prefix cache accounts for, not by every batch's buffers."""
    import mlx.core as mx

    engine = await _engine(ckpt_e2b, 8 << 20)
    try:
        rng = np.random.default_rng(5)
        prompts = [_with_image([2, TURN_OPEN] + [int(x) for x in rng.integers(10, 240, int(rng.integers(20, 200)))],
                               _image(100 + k), [TURN_END, TURN_OPEN, 60]) for k in range(80)]
        mx.clear_cache()
        before = mx.get_active_memory()
        import asyncio

        for half in (prompts[:40], prompts[40:]):
            await asyncio.gather(*(_run(engine, ids, spans, max_tokens=8) for ids, spans in half))
        grown = mx.get_active_memory() - before
        kept = engine.scheduler.prefix.nbytes
        assert len(engine.scheduler.prefix) > 10
        assert grown < 2 * kept + (4 << 20), (grown, kept)
    finally:
        engine.stop()


@pytest.mark.parametrize("variant", ["e2b", "dense"])
async def test_quantized_entries_are_smaller_and_still_hit(variant, tmp_path_factory):
    """``--kv-bits 8|4``: the stored KV shrinks (full-attention layers quantized, sliding ones as
    they are), turn 2 still reuses all of turn 1, and it decodes from the dequantized entry.
    Agreement with full precision is reported by the bench, not asserted here."""
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("kvq") / variant, variant=variant, dtype="float32")
    rng = np.random.default_rng(3)
    turn1 = [2, TURN_OPEN] + [int(x) for x in rng.integers(10, 240, 400)] + [TURN_END, TURN_OPEN, 60]
    kv_bytes = {}
    for bits in (None, 8, 4):
        e = DecoderEngine(DecoderConfig(checkpoint=str(ckpt), port=0, stream_interval_ms=0,
                                        prefix_cache_bytes=1 << 30, kv_bits=bits))
        e.start()
        await e.wait_ready()
        try:
            reply, _ = await _run(e, turn1, [])
            for _ in range(2000):  # stored on the MLX thread just after the completion went out
                if len(e.scheduler.prefix):
                    break
                await asyncio.sleep(0.001)
            kv_bytes[bits] = e.scheduler.prefix._lru.nbytes  # the KV arrays alone (no trie overhead)
            turn2 = turn1 + reply + [TURN_END, TURN_OPEN, 33, 34, TURN_END, TURN_OPEN, 60]
            got, done = await _run(e, turn2, [])
            assert done.cached_tokens == len(turn1) + len(reply) and len(got) == 12
            kinds = {type(c).__name__ + str(getattr(c, "bits", "")) for _, cache in _entries(e.scheduler.prefix)
                     for c in cache}  # stored quantized, or quantized while it decoded (RowQuantizedKV)
            assert any(k.endswith(f"QuantizedKVCache{bits}") or k == f"RowQuantizedKV{bits}"
                       for k in kinds) == bool(bits), kinds
        finally:
            e.stop()
    print("stored KV bytes by --kv-bits:", kv_bytes)
    assert kv_bytes[4] < 0.5 * kv_bytes[None] and kv_bytes[4] < kv_bytes[8] < 0.75 * kv_bytes[None], kv_bytes


def _entries(prefix):
    """(tokens, cache) of every stored entry (mlx-lm's trie, read for the test)."""
    lru = prefix._lru
    for tokens in [t for q in lru._lru._lrus.values() for _, t in q]:
        cache, rest = lru.fetch_nearest_cache("lm", list(tokens))
        if cache is not None and not rest:
            yield tokens, cache


async def test_a_cached_turn_prefilled_with_company_equals_it_computed_alone(pair):
    """Turn 2 arriving with other prompts goes through the batched, chunked prefill from its cached
    prefix — a sliding-window cache that has already rotated (turn 1 is longer than the window) —
    and gives the tokens the cache-less engine gives for it alone."""
    cached, plain = pair
    rng = np.random.default_rng(17)
    turn1 = [2, TURN_OPEN] + [int(x) for x in rng.integers(10, 240, 300)] + [TURN_END, TURN_OPEN, 60]
    reply, _ = await _run(cached, turn1, [])
    turn2 = turn1 + reply + [TURN_END, TURN_OPEN] + [int(x) for x in rng.integers(10, 240, 90)] + [TURN_END, TURN_OPEN, 60]
    others = [[2, TURN_OPEN] + [int(x) for x in rng.integers(10, 240, n)] + [TURN_END, TURN_OPEN, 60] for n in (40, 150, 7)]
    for _ in range(2000):  # turn 1's KV is stored just after its completion went out
        if len(cached.scheduler.prefix):
            break
        await asyncio.sleep(0.001)
    steps = cached.scheduler._fill.batched_steps
    got = await asyncio.gather(*(_run(cached, p, []) for p in [turn2, *others]))
    assert cached.scheduler._fill.batched_steps > steps
    assert got[0][1].cached_tokens == len(turn1) + len(reply)
    for p, (toks, _) in zip([turn2, *others], got):
        want, _ = await _run(plain, p, [])
        assert toks == want

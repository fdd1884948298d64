"""Cache points: turn 2 of a conversation reuses turn 1 on a checkpoint whose sliding windows wrapped.

Turn 1's prompt ends with a generation prompt the answered turn does not repeat (Gemma 4's empty
thought block), so turn 2 departs from the stored prompt + reply a few tokens before the end of
turn 1's prompt; a wrapped sliding window cannot be trimmed back there.  With ``cache_point`` the
decoder stores an entry at the point when it prefills turn 1 (``prefix_cache.store_point``).
Tiny checkpoints have 64-token windows; these prompts are ~120 tokens.  Float32, so "same tokens
as without the cache" compares exact computations.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio

from decoder_service.intake import check_cache_point
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import InvalidArgument
from mmserve_core.wire.tensors import RawTensor
from tests.rpc.test_prefix_cache import _engine, _run  # one engine setup and one greedy run for both
from tests.tooling.tiny_checkpoint import IDS, write_tiny_checkpoint

pytestmark = pytest.mark.asyncio(loop_scope="session")
IMG, BOI, EOI = IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"]
TURN_END, TURN_OPEN = IDS["<turn|>"], IDS["<|turn>"]
MODEL, THOUGHT = [TURN_OPEN, 60], [70, 71, 72]  # "<|turn>model\n", then "<|channel>thought\n<channel|>"


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["e2b", "dense"])
async def pair(request, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("cp") / request.param, variant=request.param,
                                 dtype="float32")
    cached, plain = await _engine(ckpt, 1 << 30), await _engine(ckpt, 0)
    yield cached, plain
    cached.stop()
    plain.stop()


def _turn1(seed: int, n: int = 110) -> tuple[list[int], int]:
    """A system + user turn of ``n`` tokens, then the generation prompt; and where turn 2 departs."""
    body = [int(t) for t in np.random.default_rng(seed).integers(110, 240, n)]
    ids = [2, TURN_OPEN, *body, TURN_END, *MODEL, *THOUGHT]
    return ids, len(ids) - len(THOUGHT)


def _turn2(turn1: list[int], point: int, reply: list[int], seed: int) -> list[int]:
    """What the template renders next: turn 1 without its thought block, the reply, a new question."""
    more = [int(t) for t in np.random.default_rng(seed).integers(110, 240, 8)]
    return turn1[:point] + reply + [TURN_END, TURN_OPEN, *more, TURN_END, *MODEL, *THOUGHT]


def _points(engine) -> dict[str, float]:
    out = {}
    for metric in engine.metrics.registry.collect():
        if metric.name == "mmserve_decoder_cache_points":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[s.labels["outcome"]] = s.value
    return out


async def test_turn_two_misses_without_a_point_and_hits_with_one(pair):
    cached, plain = pair
    turn1, point = _turn1(1)
    reply, _ = await _run(cached, turn1)
    _, d = await _run(cached, _turn2(turn1, point, reply, 2))
    assert d.cached_tokens == 0  # before: the wrapped windows cannot trim back over the thought block

    turn1, point = _turn1(3)
    before = _points(cached).get("stored", 0)
    reply, _ = await _run(cached, turn1, point=point)
    assert _points(cached).get("stored", 0) == before + 1
    turn2 = _turn2(turn1, point, reply, 4)
    got, d = await _run(cached, turn2)
    assert d.cached_tokens == point  # everything up to where turn 2 departs
    want, d_plain = await _run(plain, turn2)
    assert got == want and d_plain.cached_tokens == 0


async def test_points_of_prompts_prefilled_together(pair):
    """Several prompts at once go through the batched text prefill (chunked), which ends a chunk at
    each point; every turn 2 hits and decodes as without a cache."""
    cached, plain = pair
    firsts = [_turn1(10 + i, 90 + 7 * i) for i in range(3)]
    replies = await asyncio.gather(*(_run(cached, ids, point=p) for ids, p in firsts))
    seconds = [_turn2(ids, p, r, 20 + i) for i, ((ids, p), (r, _)) in enumerate(zip(firsts, replies))]
    got = await asyncio.gather(*(_run(cached, ids) for ids in seconds))
    want = [await _run(plain, ids) for ids in seconds]
    for (_, p), (g, d), (w, _) in zip(firsts, got, want):
        assert d.cached_tokens >= p - 1, (d.cached_tokens, p)  # at the point (one short when prefilled in rows)
        assert g == w


async def test_a_media_prompts_point(pair):
    cached, plain = pair
    rows = 12
    tensor = RawTensor((np.random.default_rng(5).standard_normal((rows, 64)) * 0.5).astype(np.float32).tobytes(),
                       "float32", (rows, 64))
    head = [2, TURN_OPEN, *range(110, 170)]
    turn1 = head + [BOI] + [IMG] * rows + [EOI] + list(range(180, 220)) + [TURN_END, *MODEL, *THOUGHT]
    spans = [T.SpanEmbedding(T.Span(len(head) + 1, rows, T.IMAGE), tensor)]
    point = len(turn1) - len(THOUGHT)
    reply, _ = await _run(cached, turn1, spans, point=point)
    turn2 = _turn2(turn1, point, reply, 6)
    got, d = await _run(cached, turn2, spans)
    assert d.cached_tokens == point
    want, _ = await _run(plain, turn2, spans)
    assert got == want


async def test_a_short_conversation_needs_no_point(pair):
    """Prompt + reply within the window: the final entry trims back by itself; no second entry."""
    cached, _ = pair
    ids = [2, TURN_OPEN, 110, 111, 112, TURN_END, *MODEL, *THOUGHT]
    before = dict(_points(cached))
    reply, _ = await _run(cached, ids, max_tokens=8, point=len(ids) - 3)
    assert _points(cached) == before
    _, d = await _run(cached, _turn2(ids, len(ids) - 3, reply, 7))
    assert d.cached_tokens == len(ids) - 3


def test_a_point_must_be_in_the_prompt_and_outside_media():
    spans = [T.Span(5, 10, T.IMAGE)]
    check_cache_point(0, 30, spans)
    check_cache_point(5, 30, spans)
    check_cache_point(15, 30, spans)
    check_cache_point(30, 30, spans)
    with pytest.raises(InvalidArgument, match="past the prompt's end"):
        check_cache_point(31, 30, spans)
    with pytest.raises(InvalidArgument, match=r"inside spans\[0\]"):
        check_cache_point(9, 30, spans)

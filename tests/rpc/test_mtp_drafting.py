"""MTP drafting (``--draft-model``): the same tokens as without a drafter, whatever it drafts.

The engine runs in this process with a random assistant drafter written on mlx-vlm's schema
(``tiny_checkpoint --drafter-for``).  Random drafts are almost always rejected, so each case also
runs with an *oracle* drafter put in its place: it proposes the continuation the target produced
without a drafter (every draft accepted), or that continuation with a wrong token in it (accepted
up to there, then the target's own token) — partial and full acceptance, deterministically.
Every case compares with the same engine's output with drafting off (``scheduler.drafter = None``
between requests, while the engine is idle).  Float32 checkpoints: a verify block's kernels sum in
another order than one-token steps, and on a random bf16 model a near-tie can flip.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import pytest_asyncio

from decoder_service.config import DecoderConfig
from decoder_service.drafter import DraftGate, DraftPolicy, check_compatible
from decoder_service.engine import DecoderEngine
from gateway.tools.grammar import tool_call_grammar
from gateway.tools.schema_grammar import Markers
from mmserve_core.wire import types as T
from mmserve_core.wire.tensors import RawTensor
from tests.rpc.test_decoder_batching import _run_full
from tests.tooling.tiny_checkpoint import (
    IDS,
    drafter_config,
    tiny_config,
    write_tiny_checkpoint,
    write_tiny_drafter,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
IMG, BOI, EOI = IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"]
AUD, BOA, EOA = IDS["<|audio|>"], IDS["<|audio>"], IDS["<audio|>"]


class Oracle:
    """Drafts what the target produced without a drafter (``ref``, after the prompt ``ids``);
    ``wrong_at``: draft positions (1-based within a round) it gets wrong on purpose."""

    def __init__(self, ids: list[int], ref: list[int], *, wrong_at: tuple[int, ...] = (), block_size: int = 4):
        self.ids, self.ref, self.wrong_at, self.block_size = ids, ref, wrong_at, block_size

    def draft(self, st, k: int) -> list[int]:
        start = len(st.fed) + 1 - len(self.ids)  # ref index of the token after the next input
        out = (self.ref[start: start + k] + [0] * k)[:k]
        for p in self.wrong_at:
            if p <= k:
                out[p - 1] = (out[p - 1] + 1) % 500 + 3
        return out


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """float32 tiny checkpoints of three shapes, each with a random drafter beside it."""
    root = tmp_path_factory.mktemp("mtp")
    out = {}
    for variant in ("e2b", "dense", "unified"):
        ckpt = write_tiny_checkpoint(root / variant, variant=variant, dtype="float32")
        out[variant] = (ckpt, write_tiny_drafter(root / f"{variant}-drafter", ckpt, seed=1))
    return out


async def _engine(ckpt, drafter, **cfg) -> DecoderEngine:
    e = DecoderEngine(DecoderConfig(checkpoint=str(ckpt), port=0, stream_interval_ms=0, draft_model=str(drafter),
                                    **cfg))
    e.start()
    await e.wait_ready()
    return e


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engines(targets):
    es = {v: await _engine(c, d, max_active=8) for v, (c, d) in targets.items()}
    yield es
    for e in es.values():
        e.stop()


def _span(rng, offset: int, rows: int, modality: str, hidden: int = 64) -> T.SpanEmbedding:
    data = (rng.standard_normal((rows, hidden)) * 0.5).astype(np.float32)
    return T.SpanEmbedding(T.Span(offset, rows, modality), RawTensor(data.tobytes(), "float32", (rows, hidden)))


def _prompt(rng, media: str = ""):
    """A prompt with an image block, an audio block, both, or text only."""
    ids = [2, 105] + [int(x) for x in rng.integers(10, 240, int(rng.integers(8, 60)))]
    spans = []
    for kind in media.split("+") if media else []:
        rows = int(rng.integers(3, 20))
        begin, place, end, modality = (BOI, IMG, EOI, T.IMAGE) if kind == "image" else (BOA, AUD, EOA, T.AUDIO)
        ids.append(begin)
        spans.append(_span(rng, len(ids), rows, modality))
        ids += [place] * rows + [end]
    return ids + [106, 105, 11], spans


async def _run(engine, ids, spans, **sampling):
    """(token ids, completion, text, logprobs) of one generation (greedy, 40 tokens unless told)."""
    return await _run_full(engine, ids, spans, **{"max_tokens": 40, **sampling})


async def _compare(engine, ids, spans, **sampling):
    """(without, random drafter, oracle, half-wrong oracle) runs of one request."""
    sched = engine.scheduler
    drafter = sched.drafter
    sched.drafter = None
    try:
        ref = await _run(engine, ids, spans, **sampling)
        sched.drafter = drafter
        rand = await _run(engine, ids, spans, **sampling)
        sched.drafter = Oracle(ids, ref[0])
        full = await _run(engine, ids, spans, **sampling)
        sched.drafter = Oracle(ids, ref[0], wrong_at=(2,))
        part = await _run(engine, ids, spans, **sampling)
    finally:
        sched.drafter = drafter
    return ref, rand, full, part


MIXES = {"e2b": ["", "image", "audio", "image+audio"], "dense": ["", "image"], "unified": ["", "image", "audio"]}


@pytest.mark.parametrize("variant,media", [(v, m) for v, ms in MIXES.items() for m in ms])
async def test_greedy_output_is_identical_with_any_drafter(engines, variant, media):
    engine = engines[variant]
    rng = np.random.default_rng(len(media) + 7)
    ids, spans = _prompt(rng, media)
    no_eos = {t: -100.0 for t in engine.eos_ids}
    # 120 tokens: past the tiny checkpoints' 64-token sliding window, so rejected drafts are
    # trimmed off a window that has wrapped
    ref, rand, full, part = await _compare(engine, ids, spans, max_tokens=120, logit_bias=no_eos)
    for got in (rand, full, part):
        assert got[0] == ref[0] and got[1].completion_tokens == 120 == len(ref[0])
        assert got[1].finish_reason == "length"
    assert ref[1].draft_tokens == 0
    assert full[1].draft_tokens > 60 and full[1].draft_accepted_tokens == full[1].draft_tokens
    assert 0 < part[1].draft_accepted_tokens < part[1].draft_tokens
    assert rand[1].draft_accepted_tokens <= rand[1].draft_tokens


async def test_stop_tokens_stop_strings_and_max_tokens_exactly(engines):
    engine = engines["e2b"]
    rng = np.random.default_rng(3)
    ids, spans = _prompt(rng)
    no_eos = {t: -100.0 for t in engine.eos_ids}
    ref, *_ = await _compare(engine, ids, spans, max_tokens=30, logit_bias=no_eos)
    stop_at = ref[0][9]
    k = ref[0].index(stop_at)
    for max_tokens in (1, 2, 5, 13):  # a round never emits past the budget
        for got in await _compare(engine, ids, spans, max_tokens=max_tokens, logit_bias=no_eos):
            assert got[0] == ref[0][:max_tokens] and got[1].completion_tokens == max_tokens
    for got in await _compare(engine, ids, spans, max_tokens=30, logit_bias=no_eos, stop_token_ids=[stop_at]):
        assert got[0] == ref[0][:k] and got[1].finish_reason == "stop" and got[1].stop_token_id == stop_at
        assert got[1].completion_tokens == k + 1
    text = ref[2]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    runs = await _compare(engine, ids, spans, max_tokens=30, logit_bias=no_eos, stop=[stop])
    for got in runs:
        assert got[2] == runs[0][2] == text[: text.find(stop)] and got[1].stop_string == stop


async def test_processors_apply_to_verified_tokens(engines):
    """Logit bias, presence penalty and logprobs: every drafted token goes through them."""
    engine = engines["dense"]
    rng = np.random.default_rng(11)
    ids, spans = _prompt(rng, "image")
    bias = {t: -100.0 for t in engine.eos_ids} | {int(x): 3.0 for x in rng.integers(256, 500, 20)}
    runs = await _compare(engine, ids, spans, max_tokens=40, logit_bias=bias, presence_penalty=1.5,
                          logprobs=True, top_logprobs=3)
    ref = runs[0]
    for got in runs[1:]:
        assert got[0] == ref[0]
        assert [lp.token_id for lp in got[3]] == ref[0]
        np.testing.assert_allclose([lp.logprob for lp in got[3]], [lp.logprob for lp in ref[3]], atol=1e-4)
        assert [[t for t, _ in lp.top] for lp in got[3]] == [[t for t, _ in lp.top] for lp in ref[3]]
    assert runs[2][1].draft_accepted_tokens == runs[2][1].draft_tokens > 0


async def test_seeded_sampling_draws_the_same_tokens(engines):
    engine = engines["unified"]
    rng = np.random.default_rng(5)
    ids, spans = _prompt(rng, "image")
    runs = await _compare(engine, ids, spans, max_tokens=40, temperature=1.0, top_p=0.95, seed=77,
                          logit_bias={t: -100.0 for t in engine.eos_ids})
    for got in runs[1:]:
        assert got[0] == runs[0][0]
    assert runs[2][1].draft_accepted_tokens == runs[2][1].draft_tokens > 0


@pytest.mark.parametrize("kind", ["json_schema", "tool_call"])
async def test_a_constraint_masks_every_verified_position(engines, kind):
    """A JSON schema (and a forced tool call's arguments) enforced on drafted tokens: the oracle
    drafting the constrained reply is accepted whole; random drafts (nearly all invalid) are
    rejected by the mask, never emitted."""
    engine = engines["e2b"]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["city", "n"],
              "additionalProperties": False}
    spec = json.dumps(schema)
    if kind == "tool_call":  # the gateway's own grammar for tool_choice "required"
        mk = Markers(IDS["<|tool_call>"], IDS["<tool_call|>"], IDS['<|"|>'], IDS["<|channel>"], IDS["<channel|>"])
        constraint = T.Constraint("lark", tool_call_grammar([T.Tool("get_weather", "", schema)], mk,
                                                            choice="required", parallel=False))
    else:
        constraint = T.Constraint("json_schema", spec)
    rng = np.random.default_rng(2)
    ids, spans = _prompt(rng)
    runs = await _compare(engine, ids, spans, max_tokens=80, constraint=constraint)
    ref = runs[0]
    assert ref[1].finish_reason == "stop"
    for got in runs[1:]:
        assert got[0] == ref[0] and got[2] == ref[2]
    if kind == "json_schema":
        assert set(json.loads(ref[2])) == {"city", "n"}
    else:
        assert ref[0][0] == IDS["<|tool_call>"] and ref[0][-1] == IDS["<tool_call|>"]
    # all accepted but the drafts past the end (the oracle knows nothing after the stop token)
    assert 0 <= runs[2][1].draft_tokens - runs[2][1].draft_accepted_tokens <= 3 < runs[2][1].draft_tokens


async def test_the_thought_budget_holds_on_drafted_tokens(engines):
    engine = engines["e2b"]
    rng = np.random.default_rng(9)
    ids, spans = _prompt(rng)
    ids = ids + [IDS["<|channel>"]]  # generation starts inside the thought channel
    no_eos = {t: -100.0 for t in engine.eos_ids}
    runs = await _compare(engine, ids, spans, max_tokens=30, logit_bias=no_eos, reasoning_budget=6)
    for got in runs:
        assert got[0] == runs[0][0]
        assert got[0][6] == IDS["<channel|>"]


async def test_a_drafting_solo_sequence_joins_the_batch_and_new_rows_never_wait(engines):
    """A sequence drafting alone moves into the batch the step a second request arrives; both
    outputs equal their runs alone, and the drafted KV it carries over is exact."""
    engine = engines["dense"]
    rng = np.random.default_rng(31)
    (a_ids, a_spans), (b_ids, b_spans) = _prompt(rng, "image"), _prompt(rng)
    no_eos = {t: -100.0 for t in engine.eos_ids}
    a_alone = await _run(engine, a_ids, a_spans, max_tokens=300, logit_bias=no_eos)
    b_alone = await _run(engine, b_ids, b_spans, max_tokens=20, logit_bias=no_eos)
    sched = engine.scheduler
    sched.drafter, drafter = Oracle(a_ids, a_alone[0]), sched.drafter
    try:
        handoffs = sched.solo_handoffs
        task_a = asyncio.ensure_future(_run(engine, a_ids, a_spans, max_tokens=300, logit_bias=no_eos))
        while (solo := sched.sequences.solo) is None or solo.generated < 40:
            await asyncio.sleep(0.001)
        b_got = await _run(engine, b_ids, b_spans, max_tokens=20, logit_bias=no_eos)
        a_got = await task_a
    finally:
        sched.drafter = drafter
    assert sched.solo_handoffs == handoffs + 1
    assert a_got[0] == a_alone[0] and b_got[0] == b_alone[0]
    assert a_got[1].draft_accepted_tokens > 20  # it drafted while alone


async def test_a_drafted_conversation_is_reused_from_the_prefix_cache(engines):
    engine = engines["e2b"]
    rng = np.random.default_rng(4)
    ids, spans = _prompt(rng)
    no_eos = {t: -100.0 for t in engine.eos_ids}
    first = await _run(engine, ids, spans, max_tokens=30, logit_bias=no_eos)
    turn2 = ids + first[0] + [106, 105, 12, 13, 106, 105]
    sched = engine.scheduler
    drafter, sched.drafter = sched.drafter, None
    try:
        plain = await _run(engine, turn2, spans, max_tokens=20, logit_bias=no_eos)
    finally:
        sched.drafter = drafter
    assert plain[1].cached_tokens > len(ids)  # reused what the drafting request fed
    again = await _run(engine, turn2, spans, max_tokens=20, logit_bias=no_eos)
    assert again[0] == plain[0] and again[1].cached_tokens > len(ids)


async def test_drafting_counters_in_prometheus(engines):
    engine = engines["unified"]
    m = engine.metrics
    before = [c._value.get() for c in (m.draft_tokens, m.draft_accepted_tokens, m.draft_rounds)]
    rng = np.random.default_rng(6)
    ids, spans = _prompt(rng)
    runs = await _compare(engine, ids, spans, max_tokens=20, logit_bias={t: -100.0 for t in engine.eos_ids})
    after = [c._value.get() for c in (m.draft_tokens, m.draft_accepted_tokens, m.draft_rounds)]
    assert after[0] - before[0] == sum(r[1].draft_tokens for r in runs)
    assert after[1] - before[1] == sum(r[1].draft_accepted_tokens for r in runs)
    assert after[2] > before[2]


# -- start-up checks and the depth policy (pure) -------------------------------------------------
def test_a_drafter_for_another_target_is_refused_naming_the_fields():
    target = tiny_config("e2b")
    target["text_config"]["num_key_value_heads"] = 2
    check_compatible(target["text_config"], drafter_config(target))
    other = drafter_config(target)
    other["backbone_hidden_size"] = 96
    other["text_config"]["head_dim"] = 8
    other["text_config"]["num_attention_heads"] = 3
    with pytest.raises(ValueError) as e:
        check_compatible(target["text_config"], other)
    msg = str(e.value)
    assert "backbone_hidden_size" in msg and "head_dim" in msg and "num_attention_heads" in msg
    with pytest.raises(ValueError, match="not a Gemma 4 MTP assistant"):
        check_compatible(target["text_config"], {**other, "model_type": "qwen3_dflash"})


async def test_the_decoder_refuses_to_start_with_an_incompatible_drafter(targets, tmp_path):
    (ckpt, _), (other, _) = targets["e2b"], targets["unified"]
    wrong = write_tiny_drafter(tmp_path / "wrong", other)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["backbone_hidden_size"] = 80
    (wrong / "config.json").write_text(json.dumps(cfg))
    e = DecoderEngine(DecoderConfig(checkpoint=str(ckpt), port=0, draft_model=str(wrong)))
    e.start()
    try:
        with pytest.raises(ValueError, match="backbone_hidden_size"):
            await e.wait_ready()
    finally:
        e.stop()


def test_the_depth_policy_follows_acceptance_and_backs_off_when_drafts_keep_failing():
    p = DraftPolicy(max_drafts=3)
    assert p.next_k(remaining=100) == 3 and p.next_k(remaining=2) == 1 and p.next_k(remaining=1) == 0
    for _ in range(4):
        p.record(3, 0)  # nothing accepted: drafting pauses
    assert [p.next_k(100) for _ in range(16)] == [0] * 16
    assert p.next_k(100) == 1  # then probes with one draft
    p.record(1, 0)
    p.record(1, 0)  # two probes rejected: a pause twice as long
    assert [p.next_k(100) for _ in range(32)] == [0] * 32
    assert p.next_k(100) == 1
    p.record(1, 1)  # a probe accepted: drafting resumes at full depth
    assert p.next_k(100) == 3
    for _ in range(8):
        p.record(3, 1)
    assert p.next_k(100) == 2  # mean 1 accepted: draft 2
    assert p.by_position[:3] == [9, 0, 0] and p.drafted == 39 and p.accepted == 9


# -- drafting in the running batch --------------------------------------------------------------
class Oracles:
    """``Oracle`` for several prompts at once (a batch's rows), told apart by their prompt."""

    def __init__(self, refs: dict[tuple, list[int]], *, wrong_at: tuple[int, ...] = ()):
        self.by_prompt = {p: Oracle(list(p), ref, wrong_at=wrong_at) for p, ref in refs.items()}
        self.block_size = 4

    def draft(self, st, k: int) -> list[int]:
        for p, oracle in self.by_prompt.items():
            if tuple(st.fed[: len(p)]) == p:
                return oracle.draft(st, k)
        raise AssertionError("a row of no known prompt")


async def _batched(engine, prompts, drafter, stagger: float = 0.0, **sampling):
    """Every prompt at once (``stagger`` s apart) with ``drafter`` in place; outputs in order."""
    sched = engine.scheduler
    before, gate = sched.drafter, sched.gate
    sched.drafter = drafter
    sched.gate = Always()  # exactness under test, not the gate's judgement of speed on this machine
    rounds = engine.metrics.draft_rounds._value.get()

    async def one(k, ids, spans):
        await asyncio.sleep(stagger * k)
        return await _run(engine, ids, spans, **sampling)

    try:
        got = await asyncio.gather(*(one(k, ids, spans) for k, (ids, spans) in enumerate(prompts)))
    finally:
        sched.drafter, sched.gate = before, gate
    return got, engine.metrics.draft_rounds._value.get() - rounds


class Always(DraftGate):
    def want(self, rows: int) -> bool:
        return True


async def _alone(engine, prompts, **sampling):
    sched = engine.scheduler
    before, sched.drafter = sched.drafter, None
    try:
        return [await _run(engine, ids, spans, **sampling) for ids, spans in prompts]
    finally:
        sched.drafter = before


@pytest.mark.parametrize("variant", ["e2b", "dense", "unified"])
async def test_batched_rows_draft_and_accept_each_their_own(engines, variant):
    """Five requests decoding together (text, image, audio; prompts past the 64-token window),
    each row drafted and accepted on its own: the oracle drafts accepted whole, the half-wrong one
    accepted up to its mistake, random ones mostly rejected — every row's output identical to the
    row alone without a drafter."""
    engine = engines[variant]
    rng = np.random.default_rng(41)
    media = ["", "image", "", "audio" if variant != "dense" else "", "image"]
    prompts = [_prompt(rng, m) for m in media]
    prompts[2] = ([2, 105] + [int(x) for x in rng.integers(10, 240, 150)] + [106, 105, 11], [])
    no_eos = {t: -100.0 for t in engine.eos_ids}
    ref = await _alone(engine, prompts, max_tokens=60, logit_bias=no_eos)
    refs = {tuple(ids): r[0] for (ids, _), r in zip(prompts, ref)}
    for drafter in (Oracles(refs), Oracles(refs, wrong_at=(2,)), engine.scheduler.drafter):
        got, rounds = await _batched(engine, prompts, drafter, max_tokens=60, logit_bias=no_eos)
        for (a, _, _, _), (b, done, _, _) in zip(ref, got):
            assert b == a and done.completion_tokens == 60
        if isinstance(drafter, Oracles):
            assert rounds > 0
            acc = sum(d.draft_accepted_tokens for _, d, _, _ in got)
            drafted = sum(d.draft_tokens for _, d, _, _ in got)
            assert acc > 100 and (acc == drafted) == (not drafter.by_prompt[next(iter(refs))].wrong_at)


async def test_batched_rounds_keep_sampling_processors_stops_and_budgets(engines):
    """Seeded sampling, logit bias and penalties, logprobs, stop tokens and token budgets of rows
    drafted together: each row as alone without a drafter; rows arrive staggered and join the
    drafting batch at step boundaries."""
    engine = engines["dense"]
    rng = np.random.default_rng(12)
    prompts = [_prompt(rng, "image" if k % 2 else "") for k in range(4)]
    bias = {t: -100.0 for t in engine.eos_ids} | {int(x): 2.0 for x in rng.integers(256, 500, 12)}
    kw = dict(max_tokens=37, temperature=0.8, top_p=0.9, seed=5, logit_bias=bias, presence_penalty=0.7,
              logprobs=True, top_logprobs=2)
    ref = await _alone(engine, prompts, **kw)
    refs = {tuple(ids): r[0] for (ids, _), r in zip(prompts, ref)}
    got, rounds = await _batched(engine, prompts, Oracles(refs), stagger=0.01, **kw)
    assert rounds > 0
    for a, b in zip(ref, got):
        assert b[0] == a[0] and b[1].completion_tokens == 37
        np.testing.assert_allclose([lp.logprob for lp in b[3]], [lp.logprob for lp in a[3]], atol=1e-4)
    stop_at = [r[0][11] for r in ref]  # each row stops at its own token
    for (ids, spans), s, a in zip(prompts, stop_at, ref):
        del ids, spans
        k = a[0].index(s)
        assert k <= 11
    got = await asyncio.gather(*(
        _batched_one(engine, Oracles(refs), ids, spans, stop_token_ids=[s], **kw)
        for (ids, spans), s in zip(prompts, stop_at)))
    for (toks, done, _, _), a, s in zip(got, ref, stop_at):
        k = a[0].index(s)
        assert toks == a[0][:k] and done.finish_reason == "stop" and done.completion_tokens == k + 1


async def _batched_one(engine, drafter, ids, spans, **sampling):
    sched = engine.scheduler
    sched.drafter, sched.gate = drafter, Always()
    return await _run(engine, ids, spans, **sampling)


def test_the_gate_drafts_only_where_rounds_beat_plain_steps():
    g = DraftGate(explore=4)
    assert not g.want(4)  # no plain step timed yet
    g.stepped(4, 0.010)
    assert g.want(4)  # a round not yet timed: try one
    g.drafted(4, 0.050, 2.0)  # 2 tokens a row for 5 steps' time: losing
    assert [g.want(4) for _ in range(5)] == [False] * 4 + [True]  # re-tried after 4 steps
    g.drafted(4, 0.050, 2.0)
    assert [g.want(4) for _ in range(9)] == [False] * 8 + [True]  # then after twice as many
    g.stepped(2, 0.010)
    g.drafted(2, 0.015, 3.0)  # 3 tokens a row for 1.5 steps' time: winning
    assert all(g.want(2) for _ in range(10))


async def test_batched_rounds_mask_constrained_rows_at_every_verified_position(engines):
    """A JSON-schema row, a forced-tool-call row and a free row drafting together: each row's
    grammar masks every verify position and consumes what the row emits; outputs as alone."""
    engine = engines["e2b"]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["city", "n"],
              "additionalProperties": False}
    mk = Markers(IDS["<|tool_call>"], IDS["<tool_call|>"], IDS['<|"|>'], IDS["<|channel>"], IDS["<channel|>"])
    constraints = [T.Constraint("json_schema", json.dumps(schema)),
                   T.Constraint("lark", tool_call_grammar([T.Tool("get_weather", "", schema)], mk,
                                                          choice="required", parallel=False)), None]
    rng = np.random.default_rng(19)
    prompts = [_prompt(rng) for _ in constraints]
    sched = engine.scheduler
    before, sched.drafter = sched.drafter, None
    try:
        ref = [await _run(engine, ids, spans, max_tokens=60, constraint=c) for (ids, spans), c in zip(prompts, constraints)]
    finally:
        sched.drafter = before
    refs = {tuple(ids): r[0] for (ids, _), r in zip(prompts, ref)}
    gate, sched.gate = sched.gate, Always()
    drafter, sched.drafter = sched.drafter, Oracles(refs)
    rounds = engine.metrics.draft_rounds._value.get()
    try:
        got = await asyncio.gather(*(_run(engine, ids, spans, max_tokens=60, constraint=c)
                                     for (ids, spans), c in zip(prompts, constraints)))
    finally:
        sched.drafter, sched.gate = drafter, gate
    assert engine.metrics.draft_rounds._value.get() > rounds
    for a, b in zip(ref, got):
        assert b[0] == a[0] and b[2] == a[2]
    assert set(json.loads(got[0][2])) == {"city", "n"}
    assert got[1][0][0] == IDS["<|tool_call>"] and got[1][0][-1] == IDS["<tool_call|>"]
    assert got[0][1].draft_accepted_tokens > 5 and got[1][1].draft_accepted_tokens > 5  # drafted, masked


async def test_drafted_media_ids_are_never_emitted(engines):
    """A drafter proposing placeholder / boundary ids (with a caller's bias pushing for them): the
    verify logits carry the suppression every step has, so none is ever accepted or emitted."""
    engine = engines["e2b"]
    media = list(engine.info.media_token_ids)

    class MediaDrafter:
        block_size = 4

        def draft(self, st, k):
            return [media[(len(st.fed) + j) % len(media)] for j in range(k)]

    rng = np.random.default_rng(23)
    ids, spans = _prompt(rng, "image")
    bias = {t: 100.0 for t in media} | {t: -100.0 for t in engine.eos_ids}
    sched = engine.scheduler
    before, sched.drafter = sched.drafter, None
    try:
        ref = await _run(engine, ids, spans, max_tokens=30, logit_bias=bias)
        sched.drafter = MediaDrafter()
        got = await _run(engine, ids, spans, max_tokens=30, logit_bias=bias)
    finally:
        sched.drafter = before
    assert got[0] == ref[0] and not set(got[0]) & set(media)
    assert got[1].draft_tokens > 0 and got[1].draft_accepted_tokens == 0

"""Continuous batching in the decoder: batched == alone, seeds, penalties, cancellation.

The engine runs in this process (its MLX thread, its scheduler); requests go
through ``DecoderEngine.generate`` — the same call the gRPC servicer makes —
and, for cancellation, through a real gRPC server on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import pytest_asyncio

from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderEngine
from decoder_service.server import SERVICE_NAME as DECODER
from decoder_service.server import start_decoder_server
from mmserve_core.runtime.grpc_runtime import set_serving
from mmserve_core.wire import types as T
from mmserve_core.wire.stubs import decoder_pb2, decoder_pb2_grpc
from mmserve_core.wire.tensors import RawTensor
from tests.tooling.tiny_checkpoint import IDS, write_tiny_checkpoint

pytestmark = pytest.mark.asyncio(loop_scope="session")
IMG, BOI, EOI = IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"]


async def _engine(ckpt, **cfg) -> DecoderEngine:
    e = DecoderEngine(DecoderConfig(checkpoint=str(ckpt), port=0, stream_interval_ms=0, **cfg))
    e.start()
    await e.wait_ready()
    return e


@pytest.fixture(scope="module")
def ckpt_dense32(tmp_path_factory):
    """31B-shaped in float32: batched kernels sum in another order than B=1 ones, and on a
    random bf16 model near-ties then flip greedy picks; f32 makes equality a fair test."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-dense32", variant="dense", dtype="float32")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dense(ckpt_dense32):
    e = await _engine(ckpt_dense32, max_active=16)
    yield e
    e.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def e2b(ckpt_e2b):
    e = await _engine(ckpt_e2b, max_active=16)
    yield e
    e.stop()


def _prompt(rng, with_image: bool, hidden: int = 64, dtype: str = "float32"):
    ids = [2, 105] + [int(x) for x in rng.integers(10, 240, int(rng.integers(4, 90)))]
    spans = []
    if with_image:
        rows = int(rng.integers(3, 40))
        ids += [BOI]
        data = (rng.standard_normal((rows, hidden)) * 0.5).astype(np.float32)
        if dtype == "bfloat16":
            raw = (data.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            raw = data.tobytes()
        spans = [T.SpanEmbedding(T.Span(len(ids), rows, T.IMAGE), RawTensor(raw, dtype, (rows, hidden)))]
        ids += [IMG] * rows + [EOI]
    return ids + [106, 105, 11], spans


async def _run(engine, ids, spans, **sampling):
    tokens, done, _, _ = await _run_full(engine, ids, spans, **sampling)
    return tokens, done


async def _run_full(engine, ids, spans, **sampling):
    """(token ids, completion, text, logprobs) of one generation."""
    s = T.SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **sampling})
    resolved = engine.validate(ids, [(sp.span, sp.tensor.dtype, sp.tensor.shape) for sp in spans], s)
    tokens, done, text, lps = [], None, "", []
    async for ev in engine.generate(ids, spans, resolved, s.stop_token_ids):
        if isinstance(ev, T.TokenEvent):
            tokens += ev.token_ids
            text += ev.text
            lps += ev.logprobs or []
        else:
            done = ev
    return tokens, done, text, lps


async def _peak_active(engine, coro):
    peak = 0
    task = asyncio.ensure_future(coro)
    while not task.done():
        peak = max(peak, engine.scheduler.active_count)
        await asyncio.sleep(0.002)
    return await task, peak


@pytest.mark.parametrize("which", ["dense", "e2b"])
async def test_eight_concurrent_greedy_requests_equal_each_alone(which, dense, e2b):
    engine = {"dense": dense, "e2b": e2b}[which]
    dtype = "float32" if which == "dense" else "bfloat16"
    rng = np.random.default_rng(7)
    prompts = [_prompt(rng, with_image=i % 2 == 0, dtype=dtype) for i in range(8)]
    bias = {t: -100.0 for t in engine.eos_ids}  # same length for all: no early stops
    alone = [await _run(engine, ids, spans, logit_bias=bias) for ids, spans in prompts]
    together, peak = await _peak_active(
        engine, asyncio.gather(*(_run(engine, ids, spans, logit_bias=bias) for ids, spans in prompts)))
    assert peak >= 4  # they really shared decode steps
    for (a, da), (b, db) in zip(alone, together):
        assert a == b and len(a) == 24
        assert da.completion_tokens == db.completion_tokens == 24 and da.finish_reason == "length"


async def test_same_seed_same_output_whatever_else_runs(dense):
    rng = np.random.default_rng(3)
    ids, spans = _prompt(rng, with_image=True)
    kw = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20)
    first, _ = await _run(dense, ids, spans, **kw)
    others = [_prompt(rng, with_image=False) for _ in range(5)]
    results = await asyncio.gather(_run(dense, ids, spans, **kw),
                                   *(_run(dense, i, s, temperature=1.0, max_tokens=30) for i, s in others))
    assert results[0][0] == first
    other_seed, _ = await _run(dense, ids, spans, **{**kw, "seed": 99})
    assert other_seed != first


async def test_presence_penalty_stops_repeats(dense):
    rng = np.random.default_rng(11)
    bias = {t: -100.0 for t in dense.eos_ids}
    for _ in range(10):  # find a prompt whose greedy output repeats tokens
        ids, spans = _prompt(rng, with_image=False)
        base, _ = await _run(dense, ids, spans, max_tokens=20, logit_bias=bias)
        if len(set(base)) < len(base):
            break
    assert len(set(base)) < len(base)
    penalised, _ = await _run(dense, ids, spans, max_tokens=20, logit_bias=bias, presence_penalty=1e4)
    assert len(set(penalised)) == len(penalised)  # context window 20 covers all 20 outputs


async def test_stop_token_ends_with_stop_and_is_not_emitted(dense):
    rng = np.random.default_rng(5)
    ids, spans = _prompt(rng, with_image=False)
    base, _ = await _run(dense, ids, spans, max_tokens=10, logit_bias={t: -100.0 for t in dense.eos_ids})
    stop_at = base[4]
    tokens, done = await _run(dense, ids, spans, max_tokens=10, stop_token_ids=[stop_at],
                              logit_bias={t: -100.0 for t in dense.eos_ids})
    k = base.index(stop_at)
    assert tokens == base[:k] and done.finish_reason == "stop" and done.stop_token_id == stop_at
    assert done.completion_tokens == k + 1


async def test_queue_bound_is_resource_exhausted(ckpt_dense32):
    engine = await _engine(ckpt_dense32, max_active=1, max_queue=1)
    try:
        rng = np.random.default_rng(1)
        ids, spans = _prompt(rng, with_image=False)
        no_eos = {t: -100.0 for t in engine.eos_ids}
        long_run = asyncio.ensure_future(_run(engine, ids, spans, max_tokens=3000, logit_bias=no_eos))
        while engine.scheduler.active_count == 0:
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(_run(engine, ids, spans, max_tokens=2, logit_bias=no_eos))  # fills the queue
        while engine.scheduler.queue_depth < 1:  # it is queued (polled, not slept)
            await asyncio.sleep(0.001)
        from mmserve_core.wire.errors import ResourceExhausted

        with pytest.raises(ResourceExhausted, match="queue is full"):
            await _run(engine, ids, spans, max_tokens=2)
        long_run.cancel()
        tokens, done = await waiting
        assert done.completion_tokens == 2
    finally:
        engine.stop()


async def test_a_burst_is_admitted_while_slots_are_free(ckpt_dense32):
    """``--max-active 4 --max-queue 2``: six requests submitted at once (faster than the MLX
    thread takes them off the queue) are all served; a seventh is refused.  The old bounded
    queue refused the third while three slots sat idle."""
    from mmserve_core.wire.errors import ResourceExhausted

    engine = await _engine(ckpt_dense32, max_active=4, max_queue=2)
    try:
        rng = np.random.default_rng(5)
        no_eos = {t: -100.0 for t in engine.eos_ids}
        gens = []
        for _ in range(6):
            ids, spans = _prompt(rng, with_image=False)
            s = T.SamplingParams(temperature=0.0, max_tokens=8, logit_bias=no_eos)
            gens.append(engine.generate(ids, [], engine.validate(ids, [], s), []))
        # an async generator starts (and submits) on its first step: start all six, then a seventh
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0)
        ids, _ = _prompt(rng, with_image=False)
        s = T.SamplingParams(temperature=0.0, max_tokens=8)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await engine.generate(ids, [], engine.validate(ids, [], s), []).__anext__()
        for f, g in zip(firsts, gens):
            assert isinstance(await f, T.TokenEvent)
            rest = [ev async for ev in g]
            assert isinstance(rest[-1], T.Completion) and rest[-1].completion_tokens == 8
    finally:
        engine.stop()


async def test_text_prompts_arriving_together_are_prefilled_together(dense):
    """A burst of text prompts (some longer than a prefill chunk while others decode) is
    prefilled in shared, chunked batches — and every output equals the same request alone."""
    rng = np.random.default_rng(41)
    prompts = [[2, 105] + [int(x) for x in rng.integers(10, 240, n)] + [106, 105, 11]
               for n in (3, 17, 60, 130, 300, 700, 45, 9)]
    no_eos = {t: -100.0 for t in dense.eos_ids}
    alone = [await _run(dense, ids, [], max_tokens=12, logit_bias=no_eos) for ids in prompts]
    steps = dense.scheduler._fill.batched_steps
    together = await asyncio.gather(*(_run(dense, ids, [], max_tokens=12, logit_bias=no_eos) for ids in prompts))
    assert dense.scheduler._fill.batched_steps > steps  # they really were prefilled together
    for (a, da), (b, db) in zip(alone, together):
        assert a == b and da.completion_tokens == db.completion_tokens == 12
        assert db.prompt_tokens == da.prompt_tokens


async def _running_stream(engine, max_tokens: int) -> tuple[asyncio.Future, list[float]]:
    """A stream decoding in the background, once it has 5 tokens: (its task, each token's arrival)."""
    short = [2, 105, 10, 11, 12, 106, 105, 11]
    s = T.SamplingParams(temperature=0.0, max_tokens=max_tokens, logit_bias={t: -100.0 for t in engine.eos_ids})
    arrivals: list[float] = []

    async def running():
        async for ev in engine.generate(short, [], engine.validate(short, [], s), []):
            if isinstance(ev, T.TokenEvent):
                arrivals.extend([time.perf_counter()] * len(ev.token_ids))

    task = asyncio.ensure_future(running())
    while len(arrivals) < 5:
        await asyncio.sleep(0.001)
    return task, arrivals


async def test_a_long_prompt_does_not_stall_running_streams(ckpt_dense32):
    """A 1,500-token prompt arriving while a stream decodes is prefilled in chunks of the budget:
    the running stream keeps getting tokens between them (before: one prefill, every stream
    waited for all of it)."""
    engine = await _engine(ckpt_dense32, max_active=4, prefill_budget_tokens=128)
    try:
        rng = np.random.default_rng(9)
        no_eos = {t: -100.0 for t in engine.eos_ids}
        task, arrivals = await _running_stream(engine, 400)
        long_ids = [2, 105] + [int(x) for x in rng.integers(10, 240, 1500)] + [106, 105, 11]
        t_submit = time.perf_counter()
        tokens, done = await _run(engine, long_ids, [], max_tokens=2, logit_bias=no_eos)
        t_first = t_submit + done.queued_ms / 1000 + done.prefill_ms / 1000
        during = [t for t in arrivals if t_submit < t < t_first]
        assert len(during) >= 6, (len(during), done.prefill_ms)  # ≥ 1500/128 chunks, a decode step after each
        task.cancel()
    finally:
        engine.stop()


async def test_a_burst_of_media_prompts_is_prefilled_between_decode_steps(ckpt_dense32):
    """Six media prompts arriving at once while a stream decodes are prefilled one after another,
    in chunks of the prefill budget (image blocks whole) — the running stream gets tokens between
    them — and each output equals the same request alone (mlx-vlm's exact path)."""
    engine = await _engine(ckpt_dense32, max_active=8, prefill_budget_tokens=16)
    try:
        rng = np.random.default_rng(13)
        no_eos = {t: -100.0 for t in engine.eos_ids}
        media = [_prompt(rng, with_image=True) for _ in range(6)]
        alone = [await _run(engine, ids, spans, max_tokens=6, logit_bias=no_eos) for ids, spans in media]
        task, arrivals = await _running_stream(engine, 2000)
        t0 = time.perf_counter()
        together = await asyncio.gather(*(_run(engine, ids, spans, max_tokens=6, logit_bias=no_eos)
                                          for ids, spans in media))
        firsts = sorted(t0 + (d.queued_ms + d.prefill_ms) / 1000 for _, d in together)
        between = [sum(1 for t in arrivals if a < t < b) for a, b in zip(firsts, firsts[1:])]
        assert sum(n > 0 for n in between) >= 3, between  # decode steps ran between the prefills
        assert [t for t, _ in together] == [t for t, _ in alone]
        task.cancel()
    finally:
        engine.stop()


def _long_media_prompt(rng, images: int = 12, rows: int = 280, hidden: int = 64):
    """~3,500 tokens: ``images`` image spans of ``rows`` float32 soft-token rows, text between."""
    ids, spans = [2, 105], []
    for _ in range(images):
        ids += [int(x) for x in rng.integers(10, 240, 10)] + [BOI]
        data = (rng.standard_normal((rows, hidden)) * 0.5).astype(np.float32)
        spans.append(T.SpanEmbedding(T.Span(len(ids), rows, T.IMAGE), RawTensor(data.tobytes(), "float32",
                                                                                (rows, hidden))))
        ids += [IMG] * rows + [EOI]
    return ids + [106, 105, 11], spans


async def test_a_long_media_prompt_does_not_stall_running_streams(ckpt_dense32):
    """A 3,500-token image prompt (twelve 280-row images, bidirectional blocks) arriving while a
    stream decodes is prefilled a chunk of the budget per step: the running stream keeps getting
    tokens between its chunks (before: one whole prefill, the stream waited for all of it), and its
    greedy output equals the one it makes alone (mlx-vlm's whole prefill, nothing else running)."""
    engine = await _engine(ckpt_dense32, max_active=4, prefix_cache_bytes=0)  # default budget: 512
    try:
        rng = np.random.default_rng(17)
        no_eos = {t: -100.0 for t in engine.eos_ids}
        ids, spans = _long_media_prompt(rng)
        assert 3000 <= len(ids) <= 4000
        alone, d_alone = await _run(engine, ids, spans, max_tokens=8, logit_bias=no_eos)
        assert engine.scheduler._media.last_chunks == 0  # alone: the exact path, never MediaPrefill
        task, arrivals = await _running_stream(engine, 3000)
        t_submit = time.perf_counter()
        got, done = await _run(engine, ids, spans, max_tokens=8, logit_bias=no_eos)
        t_start = t_submit + done.queued_ms / 1000
        t_first = t_start + done.prefill_ms / 1000
        seen = list(arrivals)
        during = [t for t in seen if t_start < t < t_first]
        edges = [max([t for t in seen if t <= t_start], default=t_start), *during,
                 min([t for t in seen if t >= t_first], default=t_first)]
        task.cancel()
        chunks = engine.scheduler._media.last_chunks
        print(f"\n{len(ids)}-token media prompt: whole prefill alone {d_alone.prefill_ms:.0f} ms; while a stream "
              f"decodes: {chunks} chunks, {done.prefill_ms:.0f} ms, {len(during)} running-stream tokens during it, "
              f"largest gap {np.diff(edges).max() * 1000:.0f} ms")
        assert chunks > 1 and len(during) > 0
        assert got == alone and done.prompt_tokens == d_alone.prompt_tokens == len(ids)
    finally:
        engine.stop()


async def test_cancel_while_media_prefilling_frees_the_slot(ckpt_dense32):
    """``--max-active 2``: a stream decodes, a long media prompt prefills in 16-token chunks, a third
    request waits for a slot.  Cancelling the media prompt mid-prefill drops it (its KV with it):
    the waiter is admitted and answered, and the media prompt never reached its first token."""
    engine = await _engine(ckpt_dense32, max_active=2, max_queue=4, prefill_budget_tokens=16,
                           prefix_cache_bytes=0)
    try:
        no_eos = {t: -100.0 for t in engine.eos_ids}
        task, _ = await _running_stream(engine, 3000)
        ids, spans = _long_media_prompt(np.random.default_rng(19), images=4)
        media = engine.scheduler._media
        begun = media.chunks_run
        prefilling = asyncio.ensure_future(_run(engine, ids, spans, max_tokens=4, logit_bias=no_eos))
        while media.chunks_run < begun + 2:  # a few chunks in (polled)
            await asyncio.sleep(0.001)
        waiter = asyncio.ensure_future(_run(engine, [2, 105, 30, 31, 106, 105, 11], [], max_tokens=3,
                                            logit_bias=no_eos))
        while engine.scheduler.queue_depth < 1:  # no free slot: it waits
            await asyncio.sleep(0.001)
        prefilling.cancel()
        tokens, done = await asyncio.wait_for(waiter, 30)
        assert done.completion_tokens == 3 and len(tokens) == 3
        assert len(media) == 0 and media.last_chunks == 0  # dropped mid-prefill, never finished
        with pytest.raises(asyncio.CancelledError):
            await prefilling
        task.cancel()
    finally:
        engine.stop()


async def test_a_failed_media_chunk_fails_that_request_only(ckpt_dense32):
    """A chunk that raises answers its own request with the error; the running stream carries on
    and the next media prompt is served."""
    engine = await _engine(ckpt_dense32, max_active=4, prefill_budget_tokens=64, prefix_cache_bytes=0)
    try:
        no_eos = {t: -100.0 for t in engine.eos_ids}
        task, arrivals = await _running_stream(engine, 3000)
        ids, spans = _long_media_prompt(np.random.default_rng(23), images=2, rows=40)
        runner = engine.scheduler.runner

        def broken(*a, **k):
            del runner.prefill_chunk  # the class's own method again
            raise RuntimeError("injected: a media chunk failed")

        runner.prefill_chunk = broken
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(_run(engine, ids, spans, max_tokens=4, logit_bias=no_eos), 30)
        before = len(arrivals)
        tokens, done = await asyncio.wait_for(_run(engine, ids, spans, max_tokens=4, logit_bias=no_eos), 30)
        assert done.completion_tokens == 4 and len(arrivals) > before and not task.done()
        task.cancel()
    finally:
        engine.stop()


async def test_a_failed_step_fails_every_request_it_held_even_those_in_hand(ckpt_dense32):
    """A bug while requests taken off the queue are being placed (here: queueing a text prompt
    for the batched prefill raises) fails them all with the error — none is left waiting
    forever — and the decoder serves the next request."""
    engine = await _engine(ckpt_dense32, max_active=4)
    try:
        no_eos = {t: -100.0 for t in engine.eos_ids}
        ids = [2, 105, 10, 11, 12, 106, 105, 11]
        solo = asyncio.ensure_future(_run(engine, ids, [], max_tokens=3000, logit_bias=no_eos))
        while engine.scheduler.sequences.solo is None:
            await asyncio.sleep(0.001)
        fill = engine.scheduler._fill

        def broken(*a, **k):
            del fill.add  # the class's own method again
            raise RuntimeError("injected: a bug while placing new requests")

        fill.add = broken
        others = [asyncio.ensure_future(_run(engine, ids + [20 + i], [], max_tokens=5)) for i in range(2)]
        got = await asyncio.wait_for(asyncio.gather(solo, *others, return_exceptions=True), 30)  # none hangs
        failed = [isinstance(g, RuntimeError) and "injected" in str(g) for g in got]
        assert failed[0] and any(failed[1:]), got  # the solo one, and the one(s) in hand
        assert all(f or g[1].completion_tokens == 5 for f, g in zip(failed, got))  # a later one: served
        tokens, done = await _run(engine, ids, [], max_tokens=4, logit_bias=no_eos)
        assert done.completion_tokens == 4
    finally:
        engine.stop()


async def test_a_failed_decode_step_fails_every_sequence_whatever_its_phase(ckpt_dense32):
    """A decode forward that raises while one sequence decodes in the batch, a media prompt and a
    text prompt are both mid-prefill (16-token budget: many steps each) and a request waits in the
    queue for a slot: every sequence the decoder holds gets the error — none is left waiting — the
    queued one is not failed but served, and so is the next request."""
    from decoder_service.sequences import Phase

    engine = await _engine(ckpt_dense32, max_active=3, max_queue=4, prefill_budget_tokens=16,
                           prefix_cache_bytes=0)
    try:
        sched, no_eos = engine.scheduler, {t: -100.0 for t in engine.eos_ids}
        held = {Phase.BATCH, Phase.PREFILL_TEXT, Phase.PREFILL_MEDIA}
        seen: list[set[Phase]] = []
        forward = sched._forward

        def broken(inputs, *a, **k):  # MLX thread: fails the first decode step that finds them all held
            phases = {s.phase for s in sched.sequences}  # and the fourth request queued
            if inputs.shape[1] == 1 and phases >= held and sched.queue_depth:
                sched._forward = forward
                seen.append(phases)
                raise RuntimeError("injected: a decode step failed")
            return forward(inputs, *a, **k)

        task, _ = await _running_stream(engine, 3000)
        sched._forward = broken
        media_ids, media_spans = _long_media_prompt(np.random.default_rng(29), images=4, rows=60)
        text_ids = [2, 105] + [int(x) for x in np.random.default_rng(31).integers(10, 240, 1500)] + [106, 105, 11]
        media = asyncio.ensure_future(_run(engine, media_ids, media_spans, max_tokens=4, logit_bias=no_eos))
        text = asyncio.ensure_future(_run(engine, text_ids, [], max_tokens=4, logit_bias=no_eos))
        while engine.scheduler.queue_depth or engine.scheduler.active_count < 3:  # all three slots taken
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(_run(engine, [2, 105, 30, 31, 106, 105, 11], [], max_tokens=3,
                                            logit_bias=no_eos))
        got = await asyncio.wait_for(asyncio.gather(task, media, text, return_exceptions=True), 60)  # none hangs
        assert seen == [held], seen  # failed once, with a sequence in each phase
        assert all(isinstance(g, RuntimeError) and "injected" in str(g) for g in got), got
        tokens, done = await asyncio.wait_for(queued, 30)
        assert done.completion_tokens == 3 and len(tokens) == 3
        assert engine.scheduler.active_count == 0
        tokens, done = await _run(engine, text_ids, [], max_tokens=2, logit_bias=no_eos)
        assert done.completion_tokens == 2
    finally:
        engine.stop()


async def test_cancelled_rpc_leaves_the_batch_within_a_step(ckpt_dense32):
    engine = await _engine(ckpt_dense32, max_active=4)
    server, port, health = await start_decoder_server(engine, "127.0.0.1:0")
    await set_serving(health, [DECODER], True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = decoder_pb2_grpc.DecoderServiceStub(ch)
            ids = [2, 105, 10, 11, 12, 106, 105, 11]
            setup = decoder_pb2.GenerateSetup(prompt_token_ids=ids, sampling=decoder_pb2.SamplingParams(
                temperature=0, max_tokens=3000, logit_bias={t: -100 for t in engine.eos_ids}))

            async def reqs():
                yield decoder_pb2.GenerateRequest(setup=setup)

            call = stub.Generate(reqs())
            got = 0
            async for msg in call:
                got += len(msg.token.token_ids)
                if got >= 5:
                    break
            assert engine.scheduler.active_count == 1
            counted = _generated(engine)
            call.cancel()
            t0 = time.monotonic()
            while engine.scheduler.active_count and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.001)
            assert engine.scheduler.active_count == 0
            assert _generated(engine) - counted <= 3  # left within a step or two, not 3000 tokens later
    finally:
        await server.stop(0)
        engine.stop()


def _generated(engine) -> float:
    for metric in engine.metrics.generated_tokens.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                return s.value
    return 0.0




async def test_stop_string_across_token_boundaries(dense):
    rng = np.random.default_rng(21)
    no_eos = {t: -100.0 for t in dense.eos_ids}
    for _ in range(20):  # find an output whose text has a spot spanning two tokens
        ids, spans = _prompt(rng, with_image=False)
        toks, _, text, _ = await _run_full(dense, ids, spans, max_tokens=16, logit_bias=no_eos)
        pieces = [dense.tokenizer.decode(toks[:i], skip_special_tokens=False) for i in range(len(toks) + 1)]
        cut = next((len(pieces[i]) for i in range(3, len(toks)) if len(pieces[i]) > len(pieces[i - 1]) > 0
                    and len(pieces[i + 1]) > len(pieces[i])), None)
        if cut and text.find(text[cut - 1 : cut + 1]) == cut - 1:
            break
    stop = text[cut - 1 : cut + 1]  # last char of one token + first char of the next
    got_toks, done, got_text, _ = await _run_full(dense, ids, spans, max_tokens=16, logit_bias=no_eos, stop=[stop])
    assert got_text == text[: cut - 1]
    assert done.finish_reason == "stop" and done.stop_string == stop and done.stop_token_id is None
    assert got_toks == toks[: len(got_toks)] and done.completion_tokens == len(got_toks)
    assert done.decode_ms > 0 and done.prompt_tokens == len(ids)  # the scheduler's completion, rewritten
    t0 = time.monotonic()
    while dense.scheduler.active_count and time.monotonic() - t0 < 5:  # matched off the MLX thread,
        await asyncio.sleep(0.001)                                       # the sequence still leaves
    assert dense.scheduler.active_count == 0


async def test_logprobs_and_top_alternatives(dense):
    rng = np.random.default_rng(8)
    ids, spans = _prompt(rng, with_image=True)
    no_eos = {t: -100.0 for t in dense.eos_ids}
    toks, done, _, lps = await _run_full(dense, ids, spans, max_tokens=12, logit_bias=no_eos,
                                         logprobs=True, top_logprobs=5)
    assert [lp.token_id for lp in lps] == toks and len(lps) == 12
    for lp in lps:
        assert len(lp.top) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0] == (lp.token_id, lp.logprob)  # greedy: the pick is the most likely
        assert sum(np.exp(values)) <= 1.0 + 1e-4 and lp.logprob <= 0
    toks2, _, _, none = await _run_full(dense, ids, spans, max_tokens=12, logit_bias=no_eos)
    assert toks2 == toks and none == []


async def test_media_ids_are_suppressed_for_every_row(dense):
    sup = np.array(dense.runner.suppress)
    assert np.isneginf(sup[dense.info.media_token_ids]).all()
    assert np.isfinite(np.delete(sup, dense.info.media_token_ids)).all()
    rng = np.random.default_rng(2)
    ids, spans = _prompt(rng, with_image=True)
    bias = {t: 100.0 for t in dense.info.media_token_ids}  # a caller pushing for them changes nothing
    toks, _, _, lps = await _run_full(dense, ids, spans, max_tokens=8, logit_bias=bias, logprobs=True,
                                      top_logprobs=20)
    assert not set(toks) & set(dense.info.media_token_ids)
    assert not {t for lp in lps for t, _ in lp.top} & set(dense.info.media_token_ids)


async def test_metrics_over_http(dense):
    import urllib.request

    from mmserve_core.runtime.metrics_http import start_metrics_server

    port = start_metrics_server(dense.metrics.registry, "127.0.0.1", 0)
    rng = np.random.default_rng(4)
    ids, spans = _prompt(rng, with_image=False)
    await _run(dense, ids, spans, max_tokens=3)
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())
    text = body.decode()
    for series in ("mmserve_decoder_active_sequences", "mmserve_decoder_queue_depth",
                   "mmserve_decoder_generated_tokens_total", "mmserve_decoder_ttft_seconds_bucket",
                   "mmserve_decoder_prefix_cache_hit_tokens_total", "mmserve_decoder_prefix_cache_bytes"):
        assert series in text, series


async def test_a_solo_sequence_joins_the_batch_when_company_arrives(dense):
    """One request decodes alone on plain caches; a second one arriving mid-way moves it into
    the batch.  Neither output changes."""
    rng = np.random.default_rng(31)
    (a_ids, a_spans), (b_ids, b_spans) = _prompt(rng, with_image=True), _prompt(rng, with_image=False)
    no_eos = {t: -100.0 for t in dense.eos_ids}
    a_alone, _ = await _run(dense, a_ids, a_spans, max_tokens=300, logit_bias=no_eos)  # long: still solo when b comes
    b_alone, _ = await _run(dense, b_ids, b_spans, max_tokens=20, logit_bias=no_eos)
    handoffs = dense.scheduler.solo_handoffs
    # a runs longer this time, so that it is still solo when b arrives on a loaded machine (greedy:
    # its first 300 tokens are the ones it made alone); its record is told from the first run's by
    # max_tokens — the MLX thread may not yet have cleared that one when its Completion arrived
    task_a = asyncio.ensure_future(_run(dense, a_ids, a_spans, max_tokens=600, logit_bias=no_eos))
    while ((solo := dense.scheduler.sequences.solo) is None or solo.job.sampling.max_tokens != 600
           or solo.generated < 5):  # a few solo steps taken
        await asyncio.sleep(0.001)
    b_got, _ = await _run(dense, b_ids, b_spans, max_tokens=20, logit_bias=no_eos)
    a_got, _ = await task_a
    assert dense.scheduler.solo_handoffs == handoffs + 1  # a really moved from its solo loop into the batch
    assert a_got[:300] == a_alone and b_got == b_alone


async def test_service_tiers_order_admission_when_the_decoder_is_full(ckpt_dense32):
    """``--max-active 1``: while one sequence runs, two ``flex`` requests and then two ``priority``
    ones wait (sent over gRPC with ``GenerateSetup.priority``); once the slot frees, both priority
    ones are served before either earlier flex one, and the default-tier request sent between them
    goes before the flex ones too.  Within one tier, first come first served."""
    engine = await _engine(ckpt_dense32, max_active=1, max_queue=8)
    server, port, health = await start_decoder_server(engine, "127.0.0.1:0")
    await set_serving(health, [DECODER], True)
    started: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = decoder_pb2_grpc.DecoderServiceStub(ch)
            no_eos = {t: -100 for t in engine.eos_ids}

            async def run(name: str, priority: int, max_tokens: int) -> None:
                setup = decoder_pb2.GenerateSetup(
                    prompt_token_ids=[2, 105, 10, 11, 12, 106, 105, 11], priority=priority,
                    sampling=decoder_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias=no_eos))

                async def reqs():
                    yield decoder_pb2.GenerateRequest(setup=setup)

                async for msg in stub.Generate(reqs()):
                    if msg.WhichOneof("payload") == "token" and name not in started:
                        started.append(name)

            first = asyncio.ensure_future(run("running", decoder_pb2.PRIORITY_DEFAULT, 60))
            while engine.scheduler.active_count == 0:
                await asyncio.sleep(0.002)
            waiting = []
            for name, prio in (("flex1", decoder_pb2.PRIORITY_LOW), ("flex2", decoder_pb2.PRIORITY_LOW),
                               ("default", decoder_pb2.PRIORITY_UNSPECIFIED),
                               ("prio1", decoder_pb2.PRIORITY_HIGH), ("prio2", decoder_pb2.PRIORITY_HIGH)):
                waiting.append(asyncio.ensure_future(run(name, prio, 3)))
                depth = len(waiting)
                while engine.scheduler.queue_depth < depth:  # queued in this order (polled)
                    await asyncio.sleep(0.001)
            assert engine.scheduler.active_count == 1 and "flex1" not in started
            await asyncio.gather(first, *waiting)
        assert started == ["running", "prio1", "prio2", "default", "flex1", "flex2"]
    finally:
        await server.stop(0)
        engine.stop()

"""Continuous batching on the decoder's MLX thread: prefill one, step all, stream each.

Why: concurrent conversations must share decode steps.  The decode loop is
mlx-lm's ``BatchGenerator`` (per-sequence samplers, logits processors, stop
sequences, batched KV caches that sequences join and leave between steps) —
we do not write our own.  What it cannot do is the multimodal prompt (soft
tokens written into the embeddings, per-layer inputs with media zeroed,
bidirectional image attention), so each new sequence is prefilled alone by
``LanguageModelRunner.prefill`` exactly as mlx-vlm would, its first token is
sampled from those logits, and it joins the batch with its filled cache and
that token as its next input.  Every later token is text fed by id.

Each loop iteration: drop cancelled sequences (their KV goes with them),
admit at most one queued request while others are decoding (a long prompt
delays running streams by one prefill, never more), run one batched decode
step, and push each sequence's token to its ``TokenChannel``.

Thread ownership: ``submit`` and ``stop`` from any thread (a bounded
``queue.Queue``); ``run`` and everything it calls on the MLX thread.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import mlx.core as mx

from decoder_service.constraints import BatchMasks, GrammarMask
from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.model import LanguageModelRunner, ResolvedSampling, SpanRows
from decoder_service.prefix_cache import PrefixCache, keyed_tokens
from decoder_service.sampler import build_processors, build_sampler
from decoder_service.stop_strings import StopStringFilter
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import ResourceExhausted

log = get_logger(__name__)
_WAKE = object()


@dataclass
class GenerationJob:
    """One request as the MLX thread sees it.  ``emit`` takes events or an exception."""

    ids: list[int]
    spans: list[SpanRows]
    sampling: ResolvedSampling
    stop_ids: frozenset[int]
    soft_tokens: int
    emit: object  # Callable[[object], None]
    media: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, media key) per span
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Active:
    job: GenerationJob
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    kids: list
    started: float
    first_at: float
    cached: int = 0
    generated: int = 1
    sampler: object = None
    processors: list = field(default_factory=list)


@dataclass
class _Solo:
    """The one sequence decoding while nothing else is: a plain-cache loop (mlx-vlm's
    ``generate_step`` pipelining), since a batch of one still pays the batch caches'
    masks and bookkeeping.  ``pending`` is the step already launched: it fed the last
    delivered token and is computing the next one."""

    a: _Active
    cache: list
    fed: list[int]  # every token whose KV is in ``cache``: prompt + generated
    pending: tuple  # (next token [1], its logprobs [1, V]) — launched, not yet read


class BatchScheduler:
    def __init__(self, runner: LanguageModelRunner, tokenizer, *, max_active: int, max_queue: int,
                 metrics=None, prefix_cache: PrefixCache | None = None) -> None:
        self.runner = runner
        self._forward = runner.logits_model()
        self._masks = BatchMasks()
        self._grammar_rows: dict[int, GrammarMask] = {}  # batch uid -> its constraint's mask
        self._new_uids: list[int] = []  # inserted since the last step, in insertion order
        self._calls: list[list[int]] = []  # the row uids of each model call the coming step makes
        self._solo: _Solo | None = None
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self.tokenizer = tokenizer
        self.max_active = max(1, max_active)
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self.active_count = 0  # read by metrics / tests from other threads
        self.solo_handoffs = 0  # solo sequences moved into the batch (read by tests from other threads)

    # -- any thread -------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"decoder queue is full ({self._queue.maxsize} requests waiting, {self.active_count} "
                "generating); retry later"
            ) from None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass

    # -- MLX thread ---------------------------------------------------------------------
    def warm_up(self, ids: list[int], sampling: ResolvedSampling) -> None:
        """Run one short sequence through prefill and the batched decode (compiles both paths)."""
        done = threading.Event()
        job = GenerationJob(ids, [], sampling, frozenset(), 0,
                            emit=lambda ev: done.set() if isinstance(ev, (T.Completion, BaseException)) else None)
        bg = self._new_generator()
        active: dict[int, _Active] = {}
        prefix, self.prefix = self.prefix, PrefixCache(0)  # warm-up KV is not worth keeping
        try:
            self._admit(bg, active, job)
            while active or self._solo is not None:
                if self._solo is not None:
                    self._solo_step(bg, active)
                else:
                    self._step(bg, active)
        finally:
            self.prefix = prefix
        self.active_count = 0

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator
        from mlx_vlm.generate.ar import generation_stream

        self._grammar_rows.clear()
        self._new_uids.clear()
        return BatchGenerator(self._batch_forward, stream=generation_stream,
                              completion_batch_size=self.max_active, prefill_batch_size=self.max_active)

    def _batch_forward(self, inputs, cache=None, **kwargs):
        """The model as the batch calls it, with every constrained row masked in one operation.

        Within one ``BatchGenerator.next()`` the model is called for the running rows first, then
        (when sequences were inserted) for the new rows alone, before they join; ``_step`` lists
        those row uids in ``_calls`` just before, so each call knows whose logits it computes."""
        logits = self._forward(inputs, cache=cache, **kwargs)
        if inputs.shape[1] != 1:
            return logits
        uids = self._calls.pop(0) if self._calls else None
        if not self._grammar_rows:
            return logits
        if uids is None or len(uids) != inputs.shape[0]:
            raise RuntimeError(f"the batch computed {inputs.shape[0]} rows where the scheduler expected "
                               f"{None if uids is None else len(uids)}")
        rows = [self._grammar_rows.get(u) for u in uids]
        return self._masks.apply(inputs, logits, rows) if any(r is not None for r in rows) else logits

    def run(self, _state=None) -> None:
        """The serving loop; returns when ``stop`` is called."""
        bg = self._new_generator()
        active: dict[int, _Active] = {}
        self._solo: _Solo | None = None
        while not self._stopping.is_set():
            try:
                self._drop_cancelled(bg, active)
                busy = bool(active) or self._solo is not None
                if len(active) + (self._solo is not None) < self.max_active:
                    job = self._next_job(block=not busy)
                    if job is not None:
                        if self._solo is not None:  # company: the solo sequence joins the batch
                            self._solo_to_batch(bg, active)
                        self._admit(bg, active, job)
                if self._solo is not None:
                    self._solo_step(bg, active)
                elif active:
                    self._step(bg, active)
                self.active_count = len(active) + (self._solo is not None)
            except Exception as e:  # noqa: BLE001 - a bug: fail what is running, keep serving
                log.error("decode step failed", traceback=traceback.format_exc(), active=len(active))
                for a in [*active.values(), *([self._solo.a] if self._solo else [])]:
                    a.job.emit(e)
                active.clear()
                self._solo = None
                self.active_count = 0
                bg = self._new_generator()
        for a in [*active.values(), *([self._solo.a] if self._solo else [])]:
            a.job.emit(RuntimeError("decoder is shutting down"))

    def _next_job(self, *, block: bool) -> GenerationJob | None:
        while True:
            try:
                job = self._queue.get(timeout=0.1) if block else self._queue.get_nowait()
            except queue.Empty:
                return None
            if job is _WAKE:
                return None
            if job.cancel.is_set():
                continue
            return job

    def _drop_cancelled(self, bg, active: dict[int, _Active]) -> None:
        solo = getattr(self, "_solo", None)
        if solo is not None and solo.a.job.cancel.is_set():
            self._solo = None
            self._store(solo.a, solo.cache, solo.fed)
            log.info("generation cancelled", tokens=solo.a.generated)
        gone = [uid for uid, a in active.items() if a.job.cancel.is_set()]
        if not gone:
            return
        caches = bg.remove(gone, return_prompt_caches=True)
        for uid in gone:
            a = active.pop(uid)
            self._grammar_rows.pop(uid, None)
            self._store(a, *caches.get(uid, (None, None)))
            log.info("generation cancelled", tokens=a.generated)
        self.active_count = len(active)

    def _admit(self, bg, active: dict[int, _Active], job: GenerationJob) -> None:
        """Prefill alone (from the longest cached prefix), sample the first token, join the batch."""

        started = time.perf_counter()
        try:
            s = job.sampling
            sampler, processors = build_sampler(s), build_processors(s)
            kids = keyed_tokens(job.ids, job.media)
            cache, hit = self._lookup(kids, job)
            cache, logits = self.runner.prefill(job.ids, job.spans, cache=cache, start=hit)
            context = mx.array(job.ids)
            for p in processors:
                logits = p(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            first = int(sampler(logprobs).item())
        except Exception as e:  # noqa: BLE001 - this request's problem only
            log.error("prefill failed", traceback=traceback.format_exc())
            job.emit(e)
            return
        a = _Active(job, IncrementalDetokenizer(self.tokenizer), StopStringFilter(list(s.stop_strings)),
                    kids, started, time.perf_counter(), cached=hit, sampler=sampler, processors=processors)
        if self.metrics is not None:
            self.metrics.ttft.observe(a.first_at - job.enqueued_at)
            self.metrics.prompt_tokens.inc(len(job.ids))
            self.metrics.prefix_hit_tokens.inc(hit)
        if self._deliver(a, first, None, logprobs):
            self._store(a, cache, list(job.ids))
            return
        if not active and getattr(self, "_solo", None) is None and self._queue.empty():
            fed = list(job.ids)
            self._solo = _Solo(a, cache, fed, self._launch(a, cache, fed, first))
            return
        self._insert(bg, active, a, cache, list(job.ids), first)

    def _insert(self, bg, active: dict[int, _Active], a: _Active, cache: list, fed: list[int], token: int) -> None:
        """Hand a sequence to the batch: its cache holds ``fed``; ``token`` is its next input."""
        from mlx_lm.generate import StopSequences

        grammar = a.job.sampling.grammar
        if not hasattr(bg, "_generation_batch"):  # an mlx-lm whose batch order we cannot read:
            grammar = None                        # the mask stays a per-row processor
        [uid] = bg.insert(
            [[token]], max_tokens=[a.job.sampling.max_tokens - a.generated], caches=[cache], all_tokens=[fed],
            samplers=[a.sampler], logits_processors=[[p for p in a.processors if p is not grammar]],
            stop_sequences=[StopSequences([[t] for t in sorted(a.job.stop_ids)])],
        )
        if grammar is not None:  # masked with the batch's others in _batch_forward, not row by row
            self._grammar_rows[uid] = grammar
        self._new_uids.append(uid)
        active[uid] = a
        self.active_count = len(active)

    # -- the solo path -------------------------------------------------------------------
    def _launch(self, a: _Active, cache: list, fed: list[int], token: int) -> tuple:
        """Feed ``token`` and start computing the next sample (asynchronously)."""
        from mlx_vlm.generate.ar import generation_stream

        fed.append(token)
        with mx.stream(generation_stream):
            logits = self._forward(mx.array([[token]]), cache=cache)[:, -1, :]
            if a.processors:
                context = mx.array(fed)
                for p in a.processors:
                    logits = p(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nxt = a.sampler(logprobs)
        mx.async_eval(nxt, logprobs)
        return nxt, logprobs

    def _solo_step(self, bg, active: dict[int, _Active]) -> None:
        solo = self._solo
        nxt, logprobs = solo.pending
        token = int(nxt.item())
        solo.a.generated += 1
        if self._queue.empty():  # keep the device busy while we deliver: launch the next step first
            solo.pending = self._launch(solo.a, solo.cache, solo.fed, token)
            if self._deliver(solo.a, token, None, logprobs):
                self._solo = None
                self._store(solo.a, solo.cache, solo.fed)
            return
        self._solo = None  # someone is waiting: continue in the batch
        if self._deliver(solo.a, token, None, logprobs):
            self._store(solo.a, solo.cache, solo.fed)
            return
        self._insert(bg, active, solo.a, solo.cache, solo.fed, token)
        self.solo_handoffs += 1

    def _solo_to_batch(self, bg, active: dict[int, _Active]) -> None:
        """A new request arrived while one sequence ran solo: read its pending token, move it over."""
        solo, self._solo = self._solo, None
        nxt, logprobs = solo.pending
        token = int(nxt.item())
        solo.a.generated += 1
        if self._deliver(solo.a, token, None, logprobs):
            self._store(solo.a, solo.cache, solo.fed)
            return
        self._insert(bg, active, solo.a, solo.cache, solo.fed, token)
        self.solo_handoffs += 1

    def _lookup(self, kids: list, job: GenerationJob) -> tuple[list | None, int]:
        """A cached prefix this prompt may start from (see ``prefix_cache``)."""
        if not self.prefix.enabled:
            return None, 0
        cache, hit = self.prefix.lookup(kids, job.media)
        if hit and self.runner.bidirectional_vision and any(
                off + length > hit for off, length, _ in job.media if _is_image(job, off)):
            # Gemma 4's bidirectional image overlay is only applied without a KV
            # prefix, so a prompt with an image after the hit is computed whole.
            return None, 0
        return cache, hit

    def _store(self, a: _Active, cache, tokens: list[int] | None) -> None:
        """Keep a finished (or cancelled) sequence's KV for later prefixes."""
        if cache is None or tokens is None or not self.prefix.enabled:
            return
        kids = a.kids + list(tokens[len(a.job.ids):])
        self.prefix.store(kids[: len(tokens)], cache)

    def _step(self, bg, active: dict[int, _Active]) -> None:
        gen = getattr(bg, "_generation_batch", None)  # mlx-lm's batch, for its row order (read only)
        running = list(gen.uids) if gen is not None else []
        self._calls = [c for c in (running, self._new_uids) if c]
        self._new_uids = []
        _, responses = bg.next()
        self._calls = []
        for r in responses:
            a = active.get(r.uid)
            if a is None:
                continue  # removed (cancelled) while its step was in flight
            a.generated += 1
            if self._deliver(a, int(r.token), r.finish_reason, r.logprobs):
                active.pop(r.uid, None)
                self._grammar_rows.pop(r.uid, None)
                if r.finish_reason is None:  # we stopped it (a stop string); the generator has not
                    cache, tokens = bg.remove([r.uid], return_prompt_caches=True).get(r.uid, (None, None))
                else:
                    cache, tokens = r.prompt_cache, r.all_tokens
                self._store(a, cache, tokens)
        self.active_count = len(active)

    def _deliver(self, a: _Active, token: int, finish: str | None, logprobs: mx.array) -> bool:
        """Emit one token (or the stop); return True when the sequence is finished."""
        job = a.job
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        if token in job.stop_ids:
            self._complete(a, "stop", stop_id=token)
            return True
        lps = [_token_logprob(token, logprobs, job.sampling.top_logprobs)] if job.sampling.logprobs else None
        text, matched = a.stops.feed(a.detok.add(token))
        job.emit(T.TokenEvent([token], text, lps))
        if matched is not None:
            self._complete(a, "stop", stop_string=matched)
            return True
        if finish is not None or a.generated >= job.sampling.max_tokens:
            self._complete(a, "length")
            return True
        return False

    def _complete(self, a: _Active, finish: str, *, stop_id: int | None = None,
                  stop_string: str | None = None) -> None:
        job = a.job
        if stop_string is None:  # release what the detokenizer and the stop filter still hold
            tail, matched = a.stops.feed(a.detok.flush())
            if matched is not None:
                finish, stop_string = "stop", matched
            else:
                tail += a.stops.flush()
            if tail:
                job.emit(T.TokenEvent([], tail, [] if job.sampling.logprobs else None))
        end = time.perf_counter()
        job.emit(T.Completion(
            finish_reason=finish,
            prompt_tokens=len(job.ids),
            completion_tokens=a.generated,
            soft_tokens=job.soft_tokens,
            queued_ms=(a.started - job.enqueued_at) * 1000.0,
            prefill_ms=(a.first_at - a.started) * 1000.0,
            decode_ms=(end - a.first_at) * 1000.0,
            stop_token_id=stop_id,
            stop_string=stop_string,
            cached_tokens=a.cached,
        ))


def _is_image(job: GenerationJob, offset: int) -> bool:
    return any(sp.offset == offset and sp.modality == T.IMAGE for sp in job.spans)


def _token_logprob(token: int, logprobs: mx.array, k: int) -> T.TokenLogprob:
    """The sampled token's log-probability and the ``k`` most likely tokens (best first)."""
    lp = logprobs.reshape(-1)
    top: list[tuple[int, float]] = []
    if k:
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx].tolist()
        top = sorted(zip(idx.tolist(), vals), key=lambda p: -p[1])
    return T.TokenLogprob(token, float(lp[token].item()), [(int(t), float(v)) for t, v in top])

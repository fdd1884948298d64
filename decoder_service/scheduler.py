"""Continuous batching on the decoder's MLX thread: admit many, prefill in chunks, step all.

Why: concurrent conversations must share decode steps.  The decode loop is
mlx-lm's ``BatchGenerator`` (per-sequence samplers, logits processors, stop
sequences, batched KV caches that sequences join and leave between steps) —
we do not write our own.  Sequences reach it with their prompt's KV filled:

* **text prompts** that arrive while others run, or together, are prefilled
  together by ``TextPrefill`` (mlx-lm's batch prompt processing), a bounded
  chunk per loop iteration (``--prefill-budget-tokens``), so a burst fills
  every free slot in a few steps and a long prompt never stalls the running
  streams for its whole prefill.  Their first token is sampled by the batch.
* **media prompts** (soft tokens written into the embeddings, per-layer inputs
  with media zeroed, bidirectional image attention) are prefilled one at a
  time by ``MediaPrefill``: while others decode, a bounded chunk per loop
  iteration (image blocks never split), so a 4,000-token image prompt no
  longer stops the running streams for its whole prefill; with nothing else
  decoding, whole by ``LanguageModelRunner.prefill`` exactly as mlx-vlm
  would.  Their first token is sampled from the last chunk's logits.
* **one request alone** takes the exact path too, and decodes on plain caches
  (``_Solo``) until company arrives: single-stream latency and mlx-vlm parity.

Each loop iteration: drop cancelled sequences (their KV goes with them), take
every queued request a free slot can hold, run one prefill chunk of the media
prompt in turn and one of the text prompts under one token budget
(``_prefill_step``), run one batched decode step, and push each sequence's
token to its ``TokenChannel``.

Admission: a request is refused (``RESOURCE_EXHAUSTED``) only when
``--max-active`` sequences are in the decoder and ``--max-queue`` more wait
behind them (``RequestQueue``).

Thread ownership: ``submit`` and ``stop`` from any thread (``RequestQueue``);
``run`` and everything it calls on the MLX thread.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field

import mlx.core as mx

from decoder_service import mlx_lm_batch
from decoder_service.constraints import BatchMasks, GrammarMask
from decoder_service.media_prefill import MediaPrefill
from decoder_service.model import LanguageModelRunner, SpanRows
from decoder_service.prefix_cache import PrefixCache, keyed_tokens
from decoder_service.request_queue import RequestQueue
from decoder_service.sampler import build_processors, build_sampler, token_logprob
from decoder_service.sampling import ResolvedSampling
from decoder_service.text_prefill import TextPrefill
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T

log = get_logger(__name__)


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
    counted: bool = False  # holds a place in the scheduler's admission count (released once)
    finish_on_cancel: bool = False  # the consumer matched a stop string: answer the cancel with a Completion
    priority: int = 1  # index into T.PRIORITIES: waiting jobs of a higher one are placed first


@dataclass
class _Active:
    job: GenerationJob
    kids: list
    started: float
    first_at: float | None = None  # when its first token was delivered
    cached: int = 0
    generated: int = 0
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
    def __init__(self, runner: LanguageModelRunner, *, max_active: int, max_queue: int,
                 metrics=None, prefix_cache: PrefixCache | None = None, prefill_budget_tokens: int = 512) -> None:
        self.runner = runner
        self._forward = runner.logits_model()
        self._fill = TextPrefill(self._forward, budget_tokens=prefill_budget_tokens)
        self._media = MediaPrefill(runner)
        self._fresh: set[int] = set()  # batch uids whose next input is their last prompt token
        self._in_hand: list[GenerationJob] = []  # taken off the queue, being placed
        self._masks = BatchMasks()
        self._grammar_rows: dict[int, GrammarMask] = {}  # batch uid -> its constraint's mask
        self._new_uids: list[int] = []  # inserted since the last step, in insertion order
        self._calls: list[list[int]] = []  # the row uids of each model call the coming step makes
        self._solo: _Solo | None = None
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self.max_active = max(1, max_active)
        self.metrics = metrics
        self.requests = RequestQueue(self.max_active, max_queue)
        self._stopping = threading.Event()
        self.active_count = 0  # read by metrics / tests from other threads
        self.solo_handoffs = 0  # solo sequences moved into the batch (read by tests from other threads)

    # -- any thread -------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> None:
        self.requests.submit(job)

    @property
    def queue_depth(self) -> int:
        return self.requests.depth

    def stop(self) -> None:
        self._stopping.set()
        self.requests.wake()

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
        self._fresh.clear()
        return BatchGenerator(self._batch_forward, stream=generation_stream,
                              completion_batch_size=self.max_active, prefill_batch_size=self.max_active)

    def _batch_forward(self, inputs, cache=None, **kwargs):
        """The model as the batch calls it, with every constrained row masked in one operation.

        ``_step`` lists the row uids of each call the coming ``next()`` makes in ``_calls``
        (``mlx_lm_batch.step_calls``: mlx-lm's internals, read in that one adapter), so each call
        knows whose logits it computes."""
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
        if not any(r is not None for r in rows):
            return logits
        # a row's first step after TextPrefill feeds its last prompt token: nothing to consume
        return self._masks.apply(inputs, logits, rows, skip=[u in self._fresh for u in uids])

    def run(self, _state=None) -> None:
        """The serving loop; returns when ``stop`` is called."""
        bg = self._new_generator()
        active: dict[int, _Active] = {}
        self._solo: _Solo | None = None
        while not self._stopping.is_set():
            try:
                self._drop_cancelled(bg, active)
                self._admit_waiting(bg, active)
                self._prefill_step(bg, active)
                if self._solo is not None:
                    self._solo_step(bg, active)
                elif active:
                    self._step(bg, active)
                self.active_count = self._occupied(active)
            except Exception as e:  # noqa: BLE001 - a bug: fail what is running, keep serving
                log.error("decode step failed", traceback=traceback.format_exc(), active=len(active))
                for job in self._everyone(active):
                    job.emit(e)
                active.clear()
                self._solo = None
                self.active_count = 0
                bg = self._new_generator()
        for job in self._everyone(active):
            job.emit(RuntimeError("decoder is shutting down"))

    def _everyone(self, active: dict[int, _Active]) -> list[GenerationJob]:
        """Every job the MLX thread holds — batch, solo, prefilling, and those taken off the queue
        but not yet placed — once each, clearing them all.  A job that already completed gets a
        second event nobody reads; one that was in hand would otherwise wait forever."""
        jobs = [a.job for a in [*active.values(), *([self._solo.a] if self._solo else []), *self._fill.clear(),
                                *self._media.clear()]]
        jobs += self._in_hand
        self._in_hand = []
        return list({id(j): j for j in jobs}.values())

    def _occupied(self, active: dict[int, _Active]) -> int:
        """Slots taken: decoding in the batch, decoding solo, or prefilling to join."""
        return len(active) + (self._solo is not None) + len(self._fill) + len(self._media)

    def _admit_waiting(self, bg, active: dict[int, _Active]) -> None:
        """Take every queued request a free slot can hold (waiting for one only when idle).

        One request alone, with nothing else in the decoder, takes the exact path and decodes
        solo.  Otherwise the solo sequence (if any) joins the batch, media prompts go to
        ``MediaPrefill`` (one at a time, in chunks) and text prompts to ``TextPrefill`` together."""
        free = self.max_active - self._occupied(active)
        if free <= 0:
            return
        idle = free == self.max_active
        jobs: list[GenerationJob] = []
        while len(jobs) < free:
            job = self.requests.next(block=idle and not jobs)
            if job is None:
                break
            jobs.append(job)
        if not jobs:
            return
        self._in_hand = jobs  # until placed: a step that fails meanwhile fails them too (``_everyone``)
        if idle and len(jobs) == 1:
            self._admit(bg, active, jobs[0])
        else:
            if self._solo is not None:  # company: the solo sequence joins the batch
                self._solo_to_batch(bg, active)
            for job in jobs:
                if job.spans:
                    self._start_media(job)
                elif len(job.ids) < 2:  # one token: nothing to batch
                    self._admit(bg, active, job)
                else:
                    self._start_fill(bg, active, job)
        self._in_hand = []
        self.active_count = self._occupied(active)

    def _open(self, job: GenerationJob) -> tuple[_Active, list | None]:
        """A job's sampler, processors and keyed tokens, and its longest cached prefix (may raise:
        the request's own problem, answered by the caller)."""
        s = job.sampling
        kids = keyed_tokens(job.ids, job.media)
        cache, hit = self._lookup(kids, job)
        return _Active(job, kids, time.perf_counter(), cached=hit, sampler=build_sampler(s),
                       processors=build_processors(s)), cache

    def _count_prompt(self, a: _Active) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(a.job.ids))
            self.metrics.prefix_hit_tokens.inc(a.cached)

    def _start_fill(self, bg, active: dict[int, _Active], job: GenerationJob) -> None:
        """Queue a text prompt for ``TextPrefill`` from its longest cached prefix."""
        try:
            a, cache = self._open(job)
        except Exception as e:  # noqa: BLE001 - this request's problem only
            log.error("prefill failed", traceback=traceback.format_exc())
            job.emit(e)
            return
        if cache is None:
            cache = self.runner.lm.make_cache()
        self._count_prompt(a)
        hit = a.cached
        if hit >= len(job.ids) - 1:  # all but the last token cached: straight to the batch
            self._insert(bg, active, a, cache, list(job.ids[:-1]), job.ids[-1], fresh=True)
        else:
            self._fill.add(a, job.ids, cache, hit)

    def _start_media(self, job: GenerationJob) -> None:
        """Queue a media prompt for ``MediaPrefill`` from its longest cached prefix."""
        try:
            a, cache = self._open(job)
        except Exception as e:  # noqa: BLE001 - this request's problem only
            log.error("prefill failed", traceback=traceback.format_exc())
            job.emit(e)
            return
        self._count_prompt(a)
        self._media.add(a, job.ids, job.spans, cache if cache is not None else self.runner.lm.make_cache(),
                        a.cached)

    def _prefill_step(self, bg, active: dict[int, _Active]) -> None:
        """One step's prompt work under one token budget (``--prefill-budget-tokens``), as vLLM
        shares one per step: the media prompt in turn takes one row's share (a whole image block if
        that is more), the text prompts share what is left (``TextPrefill``: at least 16 tokens a
        row, so neither kind starves).  Finished prompts join the batch (or decode solo)."""
        busy = bool(active)
        budget = self._fill.budget_tokens
        if len(self._media):
            res = self._media.step(busy=busy, tokens=max(1, budget // (1 + len(self._fill))))
            budget = max(0, budget - res.spent)
            for a, e in res.failed:
                log.error("prefill failed", traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)))
                a.job.emit(e)
            for a, cache, logits in res.done:
                self._first_token(bg, active, a, cache, logits)
        if len(self._fill):
            for a, cache, fed in self._fill.step(busy=busy, budget=budget):
                self._insert(bg, active, a, cache, fed, a.job.ids[-1], fresh=True)

    def _drop_cancelled(self, bg, active: dict[int, _Active]) -> None:
        solo = self._solo
        if solo is not None and solo.a.job.cancel.is_set():
            self._solo = None
            self._finish_cancelled(solo.a)
            self._store(solo.a, solo.cache, solo.fed)
            self.requests.release(solo.a.job)
            log.info("generation cancelled", tokens=solo.a.generated)
        for a in [*self._fill.drop(lambda a: a.job.cancel.is_set()),
                  *self._media.drop(lambda a: a.job.cancel.is_set())]:
            self.requests.release(a.job)
            log.info("generation cancelled while prefilling", tokens=0)
        gone = [uid for uid, a in active.items() if a.job.cancel.is_set()]
        if not gone:
            return
        caches = bg.remove(gone, return_prompt_caches=True)
        for uid in gone:
            a = active.pop(uid)
            self._grammar_rows.pop(uid, None)
            self._fresh.discard(uid)
            self._finish_cancelled(a)
            self._store(a, *caches.get(uid, (None, None)))
            self.requests.release(a.job)
            log.info("generation cancelled", tokens=a.generated)
        self.active_count = self._occupied(active)

    def _finish_cancelled(self, a: _Active) -> None:
        """A sequence its consumer ended on a stop string gets its Completion (timings, cache hit)."""
        if a.job.finish_on_cancel:
            self._complete(a, "stop")

    def _admit(self, bg, active: dict[int, _Active], job: GenerationJob) -> None:
        """Prefill alone (from the longest cached prefix), sample the first token, join the batch."""
        try:
            a, cache = self._open(job)
            cache, logits = self.runner.prefill(job.ids, job.spans, cache=cache, start=a.cached)
        except Exception as e:  # noqa: BLE001 - this request's problem only
            log.error("prefill failed", traceback=traceback.format_exc())
            job.emit(e)
            return
        self._count_prompt(a)
        self._first_token(bg, active, a, cache, logits)

    def _first_token(self, bg, active: dict[int, _Active], a: _Active, cache: list, logits: mx.array) -> None:
        """Sample a prefilled prompt's first token from its last logits (processors, logprobs),
        deliver it, and start the sequence decoding: solo when it is alone, else in the batch."""
        job = a.job
        try:
            context = mx.array(job.ids)
            for p in a.processors:
                logits = p(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            first = int(a.sampler(logprobs).item())
        except Exception as e:  # noqa: BLE001 - this request's problem only
            log.error("prefill failed", traceback=traceback.format_exc())
            job.emit(e)
            return
        a.generated = 1
        if self._deliver(a, first, None, logprobs):
            self._store(a, cache, list(job.ids))
            return
        if (not active and self._solo is None and not len(self._fill) and not len(self._media)
                and not self.requests.waiting()):
            fed = list(job.ids)
            self._solo = _Solo(a, cache, fed, self._launch(a, cache, fed, first))
            return
        self._insert(bg, active, a, cache, list(job.ids), first)

    def _insert(self, bg, active: dict[int, _Active], a: _Active, cache: list, fed: list[int], token: int,
                *, fresh: bool = False) -> None:
        """Hand a sequence to the batch: its cache holds ``fed``; ``token`` is its next input —
        the last token it sampled, or (``fresh``) its last prompt token."""
        from mlx_lm.generate import StopSequences

        grammar = a.job.sampling.grammar
        if not mlx_lm_batch.readable(bg):  # an mlx-lm whose batch order we cannot read:
            grammar = None                 # the mask stays a per-row processor
        [uid] = bg.insert(
            [[token]], max_tokens=[a.job.sampling.max_tokens - a.generated], caches=[cache], all_tokens=[fed],
            samplers=[a.sampler], logits_processors=[[p for p in a.processors if p is not grammar]],
            stop_sequences=[StopSequences([[t] for t in sorted(a.job.stop_ids)])],
        )
        if grammar is not None:  # masked with the batch's others in _batch_forward, not row by row
            self._grammar_rows[uid] = grammar
        if fresh:
            self._fresh.add(uid)
        self._new_uids.append(uid)
        active[uid] = a
        self.active_count = self._occupied(active)

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
        if not self.requests.waiting():  # keep the device busy while we deliver: launch the next step first
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
        self._calls = mlx_lm_batch.step_calls(bg, self._new_uids)
        self._new_uids = []
        _, responses = bg.next()
        self._calls = []
        self._fresh.clear()  # every row inserted before this step has now taken its first step
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
        self.active_count = self._occupied(active)

    def _deliver(self, a: _Active, token: int, finish: str | None, logprobs: mx.array) -> bool:
        """Emit one token (or the stop); return True when the sequence is finished."""
        job = a.job
        if a.first_at is None:
            a.first_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.observe(a.first_at - job.enqueued_at)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        if token in job.stop_ids:
            self._complete(a, "stop", stop_id=token)
            return True
        lps = [token_logprob(token, logprobs, job.sampling.top_logprobs)] if job.sampling.logprobs else None
        job.emit(T.TokenEvent([token], "", lps))  # ids only: text and stop strings are the consumer's
        if finish is not None or a.generated >= job.sampling.max_tokens:
            self._complete(a, "length")
            return True
        return False

    def _complete(self, a: _Active, finish: str, *, stop_id: int | None = None) -> None:
        job = a.job
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
            cached_tokens=a.cached,
            # the finished sequence's KV (its whole prompt) goes to the prefix cache (``_store``)
            cache_write_tokens=len(job.ids) - a.cached if self.prefix.enabled else 0,
        ))


def _is_image(job: GenerationJob, offset: int) -> bool:
    return any(sp.offset == offset and sp.modality == T.IMAGE for sp in job.spans)

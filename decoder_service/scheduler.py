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

from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.model import LanguageModelRunner, ResolvedSampling, SpanRows
from decoder_service.sampler import build_processors, build_sampler
from decoder_service.stop_strings import StopStringFilter
from mmserve_common import types as T
from mmserve_common.errors import ResourceExhausted
from mmserve_common.logs import get_logger

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
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Active:
    job: GenerationJob
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    started: float
    first_at: float
    generated: int = 1


class BatchScheduler:
    def __init__(self, runner: LanguageModelRunner, tokenizer, *, max_active: int, max_queue: int,
                 metrics=None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_active = max(1, max_active)
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self.active_count = 0  # read by metrics / tests from other threads

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
        self._admit(bg, active, job)
        while active:
            self._step(bg, active)
        self.active_count = 0

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator
        from mlx_vlm.generate.ar import generation_stream

        return BatchGenerator(self.runner.logits_model(), stream=generation_stream,
                              completion_batch_size=self.max_active, prefill_batch_size=self.max_active)

    def run(self, _state=None) -> None:
        """The serving loop; returns when ``stop`` is called."""
        bg = self._new_generator()
        active: dict[int, _Active] = {}
        while not self._stopping.is_set():
            try:
                self._drop_cancelled(bg, active)
                if len(active) < self.max_active:
                    job = self._next_job(block=not active)
                    if job is not None:
                        self._admit(bg, active, job)
                if active:
                    self._step(bg, active)
                self.active_count = len(active)
            except Exception as e:  # noqa: BLE001 - a bug: fail what is running, keep serving
                log.error("decode step failed", traceback=traceback.format_exc(), active=len(active))
                for a in active.values():
                    a.job.emit(e)
                active.clear()
                self.active_count = 0
                bg = self._new_generator()
        for a in active.values():
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
        gone = [uid for uid, a in active.items() if a.job.cancel.is_set()]
        if not gone:
            return
        bg.remove(gone)
        for uid in gone:
            a = active.pop(uid)
            log.info("generation cancelled", tokens=a.generated)
        self.active_count = len(active)

    def _admit(self, bg, active: dict[int, _Active], job: GenerationJob) -> None:
        """Prefill alone, sample the first token, then join the batch (unless already done)."""
        from mlx_lm.generate import StopSequences

        started = time.perf_counter()
        try:
            s = job.sampling
            sampler, processors = build_sampler(s), build_processors(s)
            cache, logits = self.runner.prefill(job.ids, job.spans)
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
                    started, time.perf_counter())
        if self.metrics is not None:
            self.metrics.ttft.observe(a.first_at - job.enqueued_at)
            self.metrics.prompt_tokens.inc(len(job.ids))
        if self._deliver(a, first, None, logprobs):
            return
        [uid] = bg.insert(
            [[first]], max_tokens=[s.max_tokens - 1], caches=[cache], all_tokens=[list(job.ids)],
            samplers=[sampler], logits_processors=[processors],
            stop_sequences=[StopSequences([[t] for t in sorted(job.stop_ids)])],
        )
        active[uid] = a
        self.active_count = len(active)

    def _step(self, bg, active: dict[int, _Active]) -> None:
        _, responses = bg.next()
        for r in responses:
            a = active.get(r.uid)
            if a is None:
                continue  # removed (cancelled) while its step was in flight
            a.generated += 1
            if self._deliver(a, int(r.token), r.finish_reason, r.logprobs):
                active.pop(r.uid, None)
                if r.finish_reason is None:  # we stopped it; the generator has not
                    bg.remove([r.uid])
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
        ))


def _token_logprob(token: int, logprobs: mx.array, k: int) -> T.TokenLogprob:
    """The sampled token's log-probability and the ``k`` most likely tokens (best first)."""
    lp = logprobs.reshape(-1)
    top: list[tuple[int, float]] = []
    if k:
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx].tolist()
        top = sorted(zip(idx.tolist(), vals), key=lambda p: -p[1])
    return T.TokenLogprob(token, float(lp[token].item()), [(int(t), float(v)) for t, v in top])

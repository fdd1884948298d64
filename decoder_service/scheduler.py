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
  (SOLO) until company arrives: single-stream latency and mlx-vlm parity.

Every sequence the loop holds is one ``Sequence`` record in one
``SequenceTable`` (``sequences.py``), from the moment it leaves the
``RequestQueue`` until its completion or error is emitted or it is cancelled;
its phase says where its work stands, and ``SequenceTable.move`` is the one
place it changes:

=============  =============================================  ===========================
phase          where its state is                             next
=============  =============================================  ===========================
(queued)       ``RequestQueue``'s heap (not in the table)      OPENING
OPENING        being opened: sampler, prefix-cache lookup      PREFILL_TEXT, PREFILL_MEDIA,
               (alone, or one token: prefilled whole)          SOLO, BATCH, DONE
PREFILL_TEXT   a ``TextPrefill`` row (its batch cache)         BATCH, DONE
PREFILL_MEDIA  a ``MediaPrefill`` row (cache, features)        SOLO, BATCH, DONE
SOLO           the record: ``cache``, ``fed``, ``pending``     BATCH, DONE
BATCH          a ``BatchGenerator`` row (``uid``)              DONE
DONE           nowhere: out of the table                       —
=============  =============================================  ===========================

A sequence finishes (``_complete``, ``_fail``, ``_cancel``) by leaving the
table; a step that raises fails ``SequenceTable.take_all()`` — every held
sequence, whatever its phase — so no waiter can be missed.  ``active_count``
is the table's size: the slots taken.

Each loop iteration: drop cancelled sequences (their KV goes with them), take
every queued request a free slot can hold, run one prefill chunk of the media
prompt in turn and one of the text prompts under one token budget
(``_prefill_step``), run one batched decode step (or the solo one), and push
each sequence's token to its ``TokenChannel``.

With a drafter (``--draft-model``) the solo step and the batch step may draft instead: how is
``drafting_steps`` (mixed in), ``speculative`` and ``batch_drafting``.

Admission: a request is refused (``RESOURCE_EXHAUSTED``) only when
``--max-active`` sequences are in the decoder and ``--max-queue`` more wait
behind them (``RequestQueue``).

Thread ownership: ``submit``, ``stop``, ``queue_depth`` and ``active_count``
from any thread; ``run``, ``warm_up`` and everything they call on the MLX
thread, which alone owns the table, the prefills and the ``BatchGenerator``.
"""

from __future__ import annotations

import threading
import time
import traceback

import mlx.core as mx

from decoder_service import cache_points, mlx_lm_batch
from decoder_service.batch_drafting import read_layers
from decoder_service.constraints import BatchMasks
from decoder_service.drafter import Drafter, DraftGate
from decoder_service.drafting_steps import DraftingSteps
from decoder_service.media_prefill import MediaPrefill
from decoder_service.model import LanguageModelRunner
from decoder_service.prefix_cache import PrefixCache, keyed_tokens
from decoder_service.quantized_kv import quantizable_layers, quantize
from decoder_service.request_queue import RequestQueue
from decoder_service.sampler import build_processors, build_sampler, token_logprob
from decoder_service.sampling import ResolvedSampling
from decoder_service.sequences import GenerationJob, Phase, Sequence, SequenceTable
from decoder_service.speculative import SpecStream
from decoder_service.text_prefill import TextPrefill
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T

__all__ = ["BatchScheduler", "GenerationJob"]

log = get_logger(__name__)


class BatchScheduler(DraftingSteps):
    def __init__(self, runner: LanguageModelRunner, *, max_active: int, max_queue: int,
                 metrics=None, prefix_cache: PrefixCache | None = None, prefill_budget_tokens: int = 512,
                 drafter: Drafter | None = None, kv_bits: int | None = None, draft_max_batch: int = 8) -> None:
        self.runner = runner
        self.drafter = drafter
        self.draft_max_batch = draft_max_batch  # a batch step drafts only with at most this many rows
        self._read_layers = read_layers(runner.lm)  # the layers whose K/V the drafter reads
        self._hidden: dict[int, mx.array] = {}  # batch uid -> its last hidden state (drafting)
        self.gate = DraftGate()  # rounds or plain steps, from their measured times per batch size
        # --kv-bits: the decoding sequences' full-attention KV quantized (``quantized_kv``)
        self.kv_bits = kv_bits
        self._quant_layers = (quantizable_layers(runner.lm, drafter=drafter is not None) if kv_bits
                              else frozenset())
        self._forward = runner.logits_model()
        self._fill = TextPrefill(self._forward, budget_tokens=prefill_budget_tokens)
        self._media = MediaPrefill(runner, on_filled=self._keep_point)
        self.sequences = SequenceTable()  # every sequence the MLX thread holds (``sequences.py``)
        self._masks = BatchMasks()
        self._new_uids: list[int] = []  # inserted since the last step, in insertion order
        self._calls: list[list[int]] = []  # the row uids of each model call the coming step makes
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self._window = getattr(runner.config.text_config, "sliding_window", None)  # cache points need it
        self.max_active = max(1, max_active)
        self.metrics = metrics
        self.requests = RequestQueue(self.max_active, max_queue)
        self._stopping = threading.Event()
        self.solo_handoffs = 0  # solo sequences moved into the batch (read by tests from other threads)

    # -- any thread -------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> None:
        self.requests.submit(job)

    @property
    def queue_depth(self) -> int:
        return self.requests.depth

    @property
    def active_count(self) -> int:
        """Slots taken — opening, prefilling or decoding (read by metrics and tests from any thread)."""
        return len(self.sequences)

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
        prefix, self.prefix = self.prefix, PrefixCache(0)  # warm-up KV is not worth keeping
        try:
            self._admit(bg, self.sequences.take(job))
            while len(self.sequences):
                if self.sequences.solo is not None:
                    self._solo_step(bg)
                else:
                    self._step(bg)
        finally:
            self.prefix = prefix

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator
        from mlx_vlm.generate.ar import generation_stream

        self._new_uids.clear()
        self._hidden.clear()
        return BatchGenerator(self._batch_forward, stream=generation_stream,
                              completion_batch_size=self.max_active, prefill_batch_size=self.max_active)

    def _batch_forward(self, inputs, cache=None, **kwargs):
        """The model as the batch calls it, with every constrained row masked in one operation.

        ``_step`` lists the row uids of each call the coming ``next()`` makes in ``_calls``
        (``mlx_lm_batch.step_calls``: mlx-lm's internals, read in that one adapter), so each call
        knows whose logits it computes."""
        if inputs.shape[1] != 1:
            return self._forward(inputs, cache=cache, **kwargs)
        uids = self._calls.pop(0) if self._calls else None
        if self.drafter is not None:  # keep each row's hidden state: a drafting round may follow
            from decoder_service import mtp_adapter

            logits, hidden, _ = mtp_adapter.forward(self.runner.lm, inputs, cache)
            logits = logits + self.runner.suppress.astype(logits.dtype)
            if uids is not None and len(uids) == inputs.shape[0]:
                normed = mtp_adapter.draft_hidden(self.runner.lm, hidden[:, -1:])  # lazy: read only if drafted
                for i, u in enumerate(uids):
                    self._hidden[u] = normed[i: i + 1]
        else:
            logits = self._forward(inputs, cache=cache, **kwargs)
        if not any(s.mask is not None for s in self.sequences.in_batch()):
            return logits
        if uids is None or len(uids) != inputs.shape[0]:
            raise RuntimeError(f"the batch computed {inputs.shape[0]} rows where the scheduler expected "
                               f"{None if uids is None else len(uids)}")
        rows = [self.sequences.batched(u) for u in uids]
        if not any(s is not None and s.mask is not None for s in rows):
            return logits
        # a row's first step after TextPrefill feeds its last prompt token: nothing to consume
        return self._masks.apply(inputs, logits, [s.mask if s is not None else None for s in rows],
                                 skip=[s is not None and s.fresh for s in rows])

    def run(self, _state=None) -> None:
        """The serving loop; returns when ``stop`` is called."""
        bg = self._new_generator()
        while not self._stopping.is_set():
            try:
                self._drop_cancelled(bg)
                self._admit_waiting(bg)
                self._prefill_step(bg)
                if self.sequences.solo is not None:
                    self._solo_step(bg)
                elif self.sequences.in_batch():
                    self._step(bg)
            except Exception as e:  # noqa: BLE001 - a bug: fail what is running, keep serving
                log.error("decode step failed", traceback=traceback.format_exc(), active=len(self.sequences))
                self._fail_all(e)
                bg = self._new_generator()
        self._fail_all(RuntimeError("decoder is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        """Answer every sequence the MLX thread holds with ``error`` — whatever its phase, each once
        (``SequenceTable.take_all``) — and drop the prefills' rows with them."""
        for seq in self.sequences.take_all():
            seq.job.emit(error)
        self._fill.clear()
        self._media.clear()

    def _admit_waiting(self, bg) -> None:
        """Take every queued request a free slot can hold (waiting for one only when idle).

        One request alone, with nothing else in the decoder, takes the exact path and decodes
        solo.  Otherwise the solo sequence (if any) joins the batch, media prompts go to
        ``MediaPrefill`` (one at a time, in chunks) and text prompts to ``TextPrefill`` together."""
        free = self.max_active - len(self.sequences)
        if free <= 0:
            return
        idle = free == self.max_active
        taken: list[Sequence] = []
        while len(taken) < free:
            job = self.requests.next(block=idle and not taken)
            if job is None:
                break
            taken.append(self.sequences.take(job))  # held (OPENING): a step that fails now fails it too
        if idle and len(taken) == 1:
            self._admit(bg, taken[0])
            return
        if taken and self.sequences.solo is not None:  # company: the solo sequence joins the batch
            self._solo_to_batch(bg)
        for seq in taken:
            if seq.job.spans:
                self._start_media(seq)
            elif len(seq.job.ids) < 2:  # one token: nothing to batch
                self._admit(bg, seq)
            else:
                self._start_fill(bg, seq)

    def _open(self, seq: Sequence) -> list | None:
        """Give a sequence its sampler, processors and keyed tokens; return its longest cached
        prefix (may raise: the request's own problem, answered by the caller)."""
        job = seq.job
        seq.kids = keyed_tokens(job.ids, job.media)
        cache, seq.cached = self._lookup(seq.kids, job)
        seq.started = time.perf_counter()
        seq.sampler, seq.processors = build_sampler(job.sampling), build_processors(job.sampling)
        return cache

    def _count_prompt(self, seq: Sequence) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(seq.job.ids))
            self.metrics.prefix_hit_tokens.inc(seq.cached)

    def _start_fill(self, bg, seq: Sequence) -> None:
        """Queue a text prompt for ``TextPrefill`` from its longest cached prefix."""
        try:
            cache = self._open(seq)
        except Exception as e:  # noqa: BLE001 - this request's problem only
            self._fail(seq, e)
            return
        if cache is None:
            cache = self.runner.lm.make_cache()
        self._count_prompt(seq)
        ids = seq.job.ids
        if seq.cached >= len(ids) - 1:  # all but the last token cached: straight to the batch
            self._insert(bg, seq, cache, list(ids[:-1]), ids[-1], fresh=True)
        else:
            self._fill.add(seq, ids, cache, seq.cached, cache_points.point(seq, self.prefix, self._window))
            self.sequences.move(seq, Phase.PREFILL_TEXT)

    def _start_media(self, seq: Sequence) -> None:
        """Queue a media prompt for ``MediaPrefill`` from its longest cached prefix."""
        try:
            cache = self._open(seq)
        except Exception as e:  # noqa: BLE001 - this request's problem only
            self._fail(seq, e)
            return
        self._count_prompt(seq)
        self._media.add(seq, seq.job.ids, seq.job.spans,
                        cache if cache is not None else self.runner.lm.make_cache(), seq.cached,
                        cache_points.point(seq, self.prefix, self._window))
        self.sequences.move(seq, Phase.PREFILL_MEDIA)

    def _prefill_step(self, bg) -> None:
        """One step's prompt work under one token budget (``--prefill-budget-tokens``), as vLLM
        shares one per step: the media prompt in turn takes one row's share (a whole image block if
        that is more), the text prompts share what is left (``TextPrefill``: at least 16 tokens a
        row, so neither kind starves).  Finished prompts join the batch (or decode solo)."""
        busy = bool(self.sequences.in_batch())
        budget = self._fill.budget_tokens
        if len(self._media):
            res = self._media.step(busy=busy, tokens=max(1, budget // (1 + len(self._fill))))
            budget = max(0, budget - res.spent)
            for seq, e in res.failed:
                self._fail(seq, e)
            for seq, cache, logits in res.done:
                self._first_token(bg, seq, cache, logits)
        if len(self._fill):
            for seq, cache, fed in self._fill.step(busy=busy, budget=budget):
                self._keep_point(seq, cache, len(fed))
                self._insert(bg, seq, cache, fed, seq.job.ids[-1], fresh=True)

    def _drop_cancelled(self, bg) -> None:
        """Finish every sequence whose consumer is gone (or matched a stop string), whatever its
        phase: its prefill row or batch row goes, its KV is kept for later prefixes if it decoded."""
        gone = [s for s in self.sequences if s.job.cancel.is_set()]  # asked once: a flag may be set meanwhile
        if not gone:
            return
        dropped = {id(s) for s in gone}
        self._fill.drop(lambda s: id(s) in dropped)
        self._media.drop(lambda s: id(s) in dropped)
        uids = [s.uid for s in gone if s.phase is Phase.BATCH]
        caches = bg.remove(uids, return_prompt_caches=True) if uids else {}
        for seq in gone:
            if seq.phase is Phase.BATCH:
                self._cancel(seq, *caches.get(seq.uid, (None, None)))
            elif seq.phase is Phase.SOLO and seq.spec is not None:
                self._cancel(seq, seq.spec.plain_cache(), seq.spec.fed)
            elif seq.phase is Phase.SOLO:
                self._cancel(seq, seq.cache, seq.fed)
            else:
                self._cancel(seq, None, None)

    def _cancel(self, seq: Sequence, cache, tokens: list[int] | None) -> None:
        """Finish a cancelled sequence: one its consumer ended on a stop string gets its Completion
        (timings, cache hit); its KV (``cache`` holding ``tokens``) goes to the prefix cache."""
        decoding = seq.phase in (Phase.SOLO, Phase.BATCH)
        if decoding and seq.job.finish_on_cancel:
            self._complete(seq, "stop")
        else:
            self.sequences.finish(seq)
        self._store(seq, cache, tokens)
        self.requests.release(seq.job)
        log.info("generation cancelled" if decoding else "generation cancelled while prefilling",
                 tokens=seq.generated)

    def _fail(self, seq: Sequence, e: BaseException) -> None:
        """This request's own problem (its prompt, its sampler): answer it with the error, finish it."""
        log.error("prefill failed", traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)))
        self.sequences.finish(seq)
        seq.job.emit(e)

    def _admit(self, bg, seq: Sequence) -> None:
        """Prefill alone (from the longest cached prefix), sample the first token, join the batch."""
        try:
            cache = self._open(seq)
            cache, logits = self.runner.prefill(
                seq.job.ids, seq.job.spans, cache=cache, start=seq.cached,
                point=cache_points.point(seq, self.prefix, self._window),
                on_filled=lambda c, n: self._keep_point(seq, c, n))
        except Exception as e:  # noqa: BLE001 - this request's problem only
            self._fail(seq, e)
            return
        self._count_prompt(seq)
        self._first_token(bg, seq, cache, logits)

    def _first_token(self, bg, seq: Sequence, cache: list, logits: mx.array) -> None:
        """Sample a prefilled prompt's first token from its last logits (processors, logprobs),
        deliver it, and start the sequence decoding: solo when it is alone, else in the batch."""
        job = seq.job
        try:
            context = mx.array(job.ids)
            for p in seq.processors:
                logits = p(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            first = int(seq.sampler(logprobs).item())
        except Exception as e:  # noqa: BLE001 - this request's problem only
            self._fail(seq, e)
            return
        seq.generated = 1
        if self._deliver(seq, first, None, logprobs):
            self._store(seq, cache, list(job.ids))
            return
        cache = self._decoding_cache(cache)
        if len(self.sequences) == 1 and not self.requests.waiting():  # alone in the decoder
            self.sequences.move(seq, Phase.SOLO)
            if self.drafter is not None:  # drafting: verified rounds (``speculative``), no launch-ahead
                seq.spec = SpecStream.start(cache, list(job.ids), first, self._policy(seq))
                return
            seq.cache, seq.fed = cache, list(job.ids)
            seq.pending = self._launch(seq, first)
            return
        self._insert(bg, seq, cache, list(job.ids), first)

    def _insert(self, bg, seq: Sequence, cache: list, fed: list[int], token: int, *, fresh: bool = False) -> None:
        """Hand a sequence to the batch: its cache holds ``fed``; ``token`` is its next input —
        the last token it sampled, or (``fresh``) its last prompt token."""
        from mlx_lm.generate import StopSequences

        job = seq.job
        cache = self._decoding_cache(cache)
        grammar = job.sampling.grammar
        if not mlx_lm_batch.readable(bg):  # an mlx-lm whose batch order we cannot read:
            grammar = None                 # the mask stays a per-row processor
        [uid] = bg.insert(
            [[token]], max_tokens=[job.sampling.max_tokens - seq.generated], caches=[cache], all_tokens=[fed],
            samplers=[seq.sampler], logits_processors=[[p for p in seq.processors if p is not grammar]],
            stop_sequences=[StopSequences([[t] for t in sorted(job.stop_ids)])],
        )
        self.sequences.move(seq, Phase.BATCH, uid=uid)
        if self.drafter is not None:
            self._policy(seq)
        seq.mask = grammar  # masked with the batch's others in _batch_forward, not row by row
        seq.fresh = fresh
        self._new_uids.append(uid)

    def _decoding_cache(self, cache: list) -> list:
        """A prefilled cache as it decodes: with ``--kv-bits``, its quantizable layers quantized
        (already quantized ones — a solo sequence joining the batch — as they are)."""
        return quantize(cache, self._quant_layers, self.kv_bits) if self._quant_layers else cache

    # -- the solo path -------------------------------------------------------------------
    def _launch(self, seq: Sequence, token: int) -> tuple:
        """Feed ``token`` to the solo sequence and start computing its next sample (asynchronously)."""
        from mlx_vlm.generate.ar import generation_stream

        fed = seq.fed
        fed.append(token)
        with mx.stream(generation_stream):
            logits = self._forward(mx.array([[token]]), cache=seq.cache)[:, -1, :]
            if seq.processors:
                context = mx.array(fed)
                for p in seq.processors:
                    logits = p(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nxt = seq.sampler(logprobs)
        mx.async_eval(nxt, logprobs)
        return nxt, logprobs

    def _read_pending(self, seq: Sequence) -> tuple[int, mx.array]:
        """The solo sequence's launched sample: (its token, its logprobs), counted as generated."""
        nxt, logprobs = seq.pending
        seq.generated += 1
        return int(nxt.item()), logprobs

    def _solo_step(self, bg) -> None:
        """One token of the solo sequence: the next step is launched before this one is delivered
        (keeping the device busy) — unless someone is waiting, then it continues in the batch."""
        if self.requests.waiting():
            self._solo_to_batch(bg)
            return
        seq = self.sequences.solo
        if seq.spec is not None:
            self._spec_step(seq)
            return
        token, logprobs = self._read_pending(seq)
        cache, fed = seq.cache, seq.fed
        seq.pending = self._launch(seq, token)
        if self._deliver(seq, token, None, logprobs):
            self._store(seq, cache, fed)

    def _solo_to_batch(self, bg) -> None:
        """Company arrived while one sequence ran solo: read its pending token, move it over."""
        seq = self.sequences.solo
        if seq.spec is not None:  # its last token is delivered already and is its next input
            st = seq.spec
            self._insert(bg, seq, st.plain_cache(), st.fed, st.bonus)
            self.solo_handoffs += 1
            return
        token, logprobs = self._read_pending(seq)
        cache, fed = seq.cache, seq.fed
        if self._deliver(seq, token, None, logprobs):
            self._store(seq, cache, fed)
            return
        self._insert(bg, seq, cache, fed, token)
        self.solo_handoffs += 1

    def _lookup(self, kids: list, job: GenerationJob) -> tuple[list | None, int]:
        """A cached prefix this prompt may start from (see ``prefix_cache``)."""
        if not self.prefix.enabled:
            return None, 0
        cache, hit = self.prefix.lookup(kids, job.media)
        if hit and self.runner.bidirectional_vision and any(
                off + length > hit for off, length, _ in job.media if _is_visual(job, off)):
            # Gemma 4's bidirectional image overlay is only applied without a KV
            # prefix, so a prompt with an image or a video frame after the hit is computed whole.
            return None, 0
        return cache, hit

    def _keep_point(self, seq: Sequence, cache: list, filled: int) -> None:
        """A prefill's cache as its last multi-token pass left it: store the entry where the
        conversation's next turn departs (``cache_points``)."""
        cache_points.keep(seq, self.prefix, self._window, cache, filled, self.metrics)

    def _store(self, seq: Sequence, cache, tokens: list[int] | None) -> None:
        """Keep a finished (or cancelled) sequence's KV for later prefixes."""
        if cache is None or tokens is None or not self.prefix.enabled:
            return
        kids = seq.kids + list(tokens[len(seq.job.ids):])
        self.prefix.store(kids[: len(tokens)], cache)

    def _step(self, bg) -> None:
        """One batched decode step: every BATCH sequence's next token, delivered — or, with a
        drafter, a drafting round over the batch when it can take one (``_draft_round``)."""
        if self.drafter is not None and self._draft_round(bg):
            return
        # inserted since the last step and still there (one cancelled meanwhile left the batch too)
        inserted = [u for u in self._new_uids if self.sequences.batched(u) is not None]
        self._new_uids = []
        self._calls = mlx_lm_batch.step_calls(bg, inserted)
        rows = len(self._calls[0]) if self._calls and not inserted else 0
        t0 = time.perf_counter()
        _, responses = bg.next()
        if rows and self.drafter is not None:  # a steady step (no rows joining): the gate's plain time
            self.gate.stepped(rows, time.perf_counter() - t0)
        self._calls = []
        for uid in inserted:  # every row inserted before this step has now taken its first step
            if (seq := self.sequences.batched(uid)) is not None:
                seq.fresh = False
        self._respond(bg, responses)

    def _respond(self, bg, responses) -> None:
        """Deliver a step's (or a round's) responses, in order; finished rows' KV is stored."""
        for r in responses:
            seq = self.sequences.batched(r.uid)
            if seq is None:
                continue  # removed (cancelled) while its step was in flight
            seq.generated += 1
            if self._deliver(seq, int(r.token), r.finish_reason, r.logprobs):
                if r.finish_reason is None:  # we stopped it (a stop string); the generator has not
                    cache, tokens = bg.remove([r.uid], return_prompt_caches=True).get(r.uid, (None, None))
                else:
                    cache, tokens = r.prompt_cache, r.all_tokens
                self._store(seq, cache, tokens)

    def _deliver(self, seq: Sequence, token: int, finish: str | None, logprobs: mx.array) -> bool:
        """Emit one token (or the stop); return True when the sequence is finished (``_complete``)."""
        job = seq.job
        if seq.first_at is None:
            seq.first_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.observe(seq.first_at - job.enqueued_at)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        if token in job.stop_ids:
            self._complete(seq, "stop", stop_id=token)
            return True
        lps = [token_logprob(token, logprobs, job.sampling.top_logprobs)] if job.sampling.logprobs else None
        job.emit(T.TokenEvent([token], "", lps))  # ids only: text and stop strings are the consumer's
        if finish is not None or seq.generated >= job.sampling.max_tokens:
            self._complete(seq, "length")
            return True
        return False

    def _complete(self, seq: Sequence, finish: str, *, stop_id: int | None = None) -> None:
        """Finish a sequence that decoded: it leaves the table and its Completion is emitted."""
        job = seq.job
        end = time.perf_counter()
        self.sequences.finish(seq)
        job.emit(T.Completion(
            finish_reason=finish,
            prompt_tokens=len(job.ids),
            completion_tokens=seq.generated,
            soft_tokens=job.soft_tokens,
            queued_ms=(seq.started - job.enqueued_at) * 1000.0,
            prefill_ms=(seq.first_at - seq.started) * 1000.0,
            decode_ms=(end - seq.first_at) * 1000.0,
            stop_token_id=stop_id,
            cached_tokens=seq.cached,
            # the finished sequence's KV (its whole prompt) goes to the prefix cache (``_store``)
            cache_write_tokens=len(job.ids) - seq.cached if self.prefix.enabled else 0,
            draft_tokens=seq.drafted,
            draft_accepted_tokens=seq.accepted,
        ))


def _is_visual(job: GenerationJob, offset: int) -> bool:
    """An image or video-frame block: bidirectional on the checkpoints that say so (audio stays causal)."""
    return any(sp.offset == offset and sp.modality in (T.IMAGE, T.VIDEO) for sp in job.spans)

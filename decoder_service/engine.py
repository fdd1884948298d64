"""Decoder engine: validation on the event loop, batched generation on the one MLX thread.

Why: the asyncio handler must never run MLX (MLX streams are thread-local),
so a request is validated and resolved on the event loop, then queued to the
``BatchScheduler``, whose serving loop runs as a long job on the
``MLXWorker`` thread that loaded the model.  Tokens flow back through a
``TokenChannel`` per request (one wake-up per batch of tokens); a cancelled
caller sets a ``threading.Event`` and its sequence leaves the batch before
the next decode step.

Thread ownership: ``generate``/``validate`` on the event loop;
``_load_and_warm`` and the scheduler loop on the MLX thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

from decoder_service.channel import TokenChannel
from decoder_service.config import DecoderConfig
from decoder_service.constraints import ConstraintCompiler, GrammarMask
from decoder_service.intake import StreamLimits
from decoder_service.metrics import DecoderMetrics
from decoder_service.model import SpanRows
from decoder_service.output_text import OutputText
from decoder_service.placement import validate_prompt
from decoder_service.prefix_cache import PrefixCache, media_key
from decoder_service.sampling import ResolvedSampling, resolve_sampling
from decoder_service.scheduler import BatchScheduler
from decoder_service.sequences import GenerationJob
from decoder_service.thought_budget import ThoughtBudget
from mmserve_core.digests import template_digest, tokenizer_digest
from mmserve_core.runtime.checkpoint import CheckpointInfo, read_checkpoint
from mmserve_core.runtime.logs import get_logger
from mmserve_core.runtime.mlx_thread import MLXWorker
from mmserve_core.runtime.wired_memory import wire_weights
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import InvalidArgument, Unavailable

log = get_logger(__name__)


class DecoderEngine:
    def __init__(self, cfg: DecoderConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.info: CheckpointInfo = read_checkpoint(cfg.checkpoint, cfg.model_id)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
        tok_eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.eos_ids: list[int] = self.info.eos_token_ids(tok_eos)
        template = getattr(self.tokenizer, "chat_template", None)
        self.chat_template: str = template if isinstance(template, str) else ""
        # declared in GetModelInfo: a gateway routes only to decoders that read prompts as it does
        self.tokenizer_digest, self.template_digest = tokenizer_digest(self.tokenizer), template_digest(template)
        self.context_length = min(
            self.info.context_length, cfg.context_length or self.info.context_length
        )
        self.placeholder_ids: dict[str, int] = {}
        if self.info.image is not None and self.info.has_vision_path:
            self.placeholder_ids[T.IMAGE] = self.info.image.placeholder
        if self.info.audio is not None and self.info.has_audio_path:
            self.placeholder_ids[T.AUDIO] = self.info.audio.placeholder
        if self.info.video is not None and self.info.has_vision_path:
            self.placeholder_ids[T.VIDEO] = self.info.video.placeholder
        self.worker = MLXWorker("decoder-mlx", max_queue=4)
        self.metrics = DecoderMetrics()
        self.runner = None
        self.scheduler: BatchScheduler | None = None
        self._loop_job: asyncio.Future | None = None
        self.dtype: str | None = None
        self.constraints = ConstraintCompiler(self.tokenizer, self.info.vocab_size, self.eos_ids)
        self.stream_limits = StreamLimits(cfg.max_open_streams, cfg.max_buffered_bytes, cfg.stream_idle_timeout_s)

    @property
    def load(self) -> tuple[int, int]:
        """``(requests in the decoder, its capacity)`` (any thread): ``request_queue.RequestQueue.load``."""
        if self.scheduler is None:
            return 0, self.cfg.max_active + self.cfg.max_queue
        return self.scheduler.requests.load

    @property
    def capabilities(self) -> frozenset[str]:
        """What this decoder honours beyond the fields every version has (``GetModelInfo``): a gateway
        sends a request needing one only to decoders that declare it."""
        caps = {"priority", "cache_point", "constraints", "logprobs"}
        if self._thought_ids() is not None:
            caps.add("thought_budget")
        if self.cfg.draft_model:
            caps.add("drafting")
        if T.VIDEO in self.placeholder_ids:
            caps.add("video")
        return frozenset(caps)

    def _thought_ids(self) -> tuple[int, int] | None:
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|channel>", "<channel|>")]
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            return None
        return ids[0], ids[1]

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.worker.start(self._load_and_warm)

    async def wait_ready(self) -> None:
        await self.worker.wait_ready()
        if self._loop_job is None:
            self._loop_job = self.worker.submit(self.scheduler.run)
            self._loop_job.add_done_callback(_loop_ended)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.worker.stop()

    def _load_and_warm(self):
        """MLX thread: load the language model only, then one short batched generation."""
        from decoder_service.model import LanguageModelRunner

        t0 = time.perf_counter()
        if self.cfg.mlx_cache_bytes is not None:
            import mlx.core as mx

            mx.set_cache_limit(self.cfg.mlx_cache_bytes)
        runner = LanguageModelRunner(Path(self.cfg.checkpoint))
        wire_weights(runner.param_bytes, "language model")
        drafter = None
        if self.cfg.draft_model:
            from decoder_service.drafter import Drafter

            drafter = Drafter(Path(self.cfg.draft_model), runner.lm, block_size=self.cfg.draft_block_size)
        scheduler = BatchScheduler(runner, max_active=self.cfg.max_active,
                                   max_queue=self.cfg.max_queue, metrics=self.metrics,
                                   prefix_cache=PrefixCache(self.cfg.prefix_cache_bytes, self.cfg.kv_bits),
                                   prefill_budget_tokens=self.cfg.prefill_budget_tokens, drafter=drafter,
                                   kv_bits=self.cfg.kv_bits, draft_max_batch=self.cfg.draft_max_batch)
        warm = resolve_sampling(
            T.SamplingParams(temperature=0.0, max_tokens=3),
            prompt_len=2, context_length=self.context_length, vocab_size=self.info.vocab_size,
            generation_config={},
        )
        bos = self.info.config.get("bos_token_id", 2) or 2
        scheduler.warm_up([bos, 10], warm)
        self.runner, self.scheduler = runner, scheduler
        self.dtype = runner.dtype
        self.metrics.bind(scheduler)
        log.info("decoder ready", checkpoint=self.cfg.checkpoint, dtype=runner.dtype,
                 lm_param_bytes=runner.param_bytes, eos=self.eos_ids, max_active=self.cfg.max_active,
                 drafter=self.cfg.draft_model, draft_block_size=drafter.block_size if drafter else None,
                 load_s=round(time.perf_counter() - t0, 3))
        return runner

    # -- request path -----------------------------------------------------------
    async def validate_async(
        self, ids: list[int], spans: list[tuple[T.Span, str, tuple[int, ...]]], sampling: T.SamplingParams
    ) -> ResolvedSampling:
        """``validate`` for the event loop: a request with a constraint is checked in a worker thread,
        so compiling its grammar (milliseconds, more for a large schema; cached by digest) never
        holds the loop that streams everyone else's tokens."""
        if sampling.constraint is None:
            return self.validate(ids, spans, sampling)
        return await asyncio.to_thread(self.validate, ids, spans, sampling)

    def validate(
        self, ids: list[int], spans: list[tuple[T.Span, str, tuple[int, ...]]], sampling: T.SamplingParams
    ) -> ResolvedSampling:
        """Event loop: reject bad prompts before any bytes are buffered or MLX runs."""
        validate_prompt(
            ids,
            spans,
            placeholder_ids=self.placeholder_ids,
            all_placeholder_ids=self.info.placeholder_token_ids,
            vocab_size=self.info.vocab_size,
            hidden_size=self.info.hidden_size,
            context_length=self.context_length,
        )
        resolved = resolve_sampling(
            sampling,
            prompt_len=len(ids),
            context_length=self.context_length,
            vocab_size=self.info.vocab_size,
            generation_config=self.info.generation_config,
        )
        if sampling.reasoning_budget is not None:
            resolved = dataclasses.replace(resolved, thought_budget=self._thought_budget(sampling.reasoning_budget))
        if sampling.constraint is None:
            return resolved
        # compiled here (cached by digest), never on the MLX thread; each sequence its own matcher
        matcher = self.constraints.matcher(self.constraints.compile(sampling.constraint))
        return dataclasses.replace(resolved, grammar=GrammarMask(matcher, self.info.vocab_size, self.eos_ids))

    def _thought_budget(self, budget: int) -> ThoughtBudget:
        ids = self._thought_ids()
        if ids is None:
            raise InvalidArgument("sampling.reasoning_budget: this model has no thought channel")
        if budget < 1:
            raise InvalidArgument("sampling.reasoning_budget must be at least 1")
        return ThoughtBudget(budget, *ids)

    async def generate(
        self,
        ids: list[int],
        spans: list[T.SpanEmbedding],
        resolved: ResolvedSampling,
        extra_stop_ids: list[int],
        priority: str = "default",
        cache_point: int = 0,
    ) -> AsyncIterator[T.TokenEvent | T.Completion]:
        """Queue a generation and yield its events; closing the iterator cancels it.  ``priority``
        (``T.PRIORITIES``) orders it among the waiting requests while the decoder is full; ``cache_point``:
        where the conversation's next turn departs (``cache_points``)."""
        if self.scheduler is None or self._loop_job is None or self._loop_job.done():
            raise Unavailable("decoder is not serving")
        channel = TokenChannel(asyncio.get_running_loop(), self.cfg.stream_interval_ms / 1000.0)
        # the prefix cache's key for each span: a digest of its bytes (~1 ms a MB), off the event loop
        keys = await asyncio.to_thread(lambda: [media_key(s.tensor.data, s.tensor.dtype) for s in spans]) \
            if spans else []
        job = GenerationJob(
            ids=ids,
            spans=[SpanRows(s.span.offset, s.tensor.to_numpy(), s.tensor.dtype, s.span.modality) for s in spans],
            sampling=resolved,
            stop_ids=frozenset(self.eos_ids) | frozenset(extra_stop_ids),
            soft_tokens=sum(s.span.length for s in spans),
            emit=channel.put,
            media=[(s.span.offset, s.span.length, k) for s, k in zip(spans, keys)],
            priority=T.PRIORITIES.index(priority),
            cache_point=cache_point,
        )
        out = OutputText(self.tokenizer, resolved.stop_strings, resolved.logprobs)
        self.scheduler.submit(job)
        try:
            while True:
                for ev in await channel.get_batch():
                    if isinstance(ev, BaseException):
                        raise ev
                    if isinstance(ev, T.Completion):
                        tail, done = out.finish(ev)
                        if tail is not None:
                            yield tail
                        yield done
                        return
                    shown = out.feed(ev)
                    if shown is not None:
                        yield shown
                    if out.matched is not None and not job.finish_on_cancel:
                        job.finish_on_cancel = True  # the scheduler answers with the Completion
                        job.cancel.set()
        finally:
            job.cancel.set()  # caller gone or done: the sequence leaves the batch before the next step


def _loop_ended(fut: asyncio.Future) -> None:
    if fut.cancelled() or fut.exception() is not None:
        log.error("decoder serving loop ended", error=repr(None if fut.cancelled() else fut.exception()))

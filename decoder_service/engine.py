"""Decoder engine: validation on the event loop, generation on the one MLX thread.

Why: the asyncio handler must never run MLX (MLX streams are thread-local),
so a request is validated and resolved on the event loop, then queued to the
``MLXWorker`` thread, which owns the ``LanguageModelRunner``.  Generated tokens
flow back through a ``TokenChannel`` (one wake-up per batch, tokens the
caller has not yet taken are merged into one event); a
cancelled caller sets a ``threading.Event`` the MLX thread checks after every
token, so an abandoned sequence stops at the next step.

This first engine serves one sequence at a time in arrival order (bounded
queue, ``RESOURCE_EXHAUSTED`` beyond it); continuous batching replaces
``_run_generation`` without touching the transport.

Thread ownership: ``generate``/``validate`` on the event loop;
``_load_and_warm`` and ``_run_generation`` on the MLX thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from decoder_service.channel import TokenChannel
from decoder_service.config import DecoderConfig
from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.model import ResolvedSampling, SpanRows
from decoder_service.placement import validate_prompt
from decoder_service.sampling import resolve_sampling
from mmserve_common import types as T
from mmserve_common.checkpoint import CheckpointInfo, read_checkpoint
from mmserve_common.errors import Unavailable
from mmserve_common.logs import get_logger
from mmserve_common.mlx_thread import MLXWorker

log = get_logger(__name__)


@dataclass
class GenerationJob:
    ids: list[int]
    spans: list[SpanRows]
    sampling: ResolvedSampling
    stop_ids: frozenset[int]
    soft_tokens: int
    emit: Callable[[object], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


class DecoderEngine:
    def __init__(self, cfg: DecoderConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.info: CheckpointInfo = read_checkpoint(cfg.checkpoint, cfg.model_id)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
        tok_eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.eos_ids: list[int] = self.info.eos_token_ids(tok_eos)
        self.context_length = min(
            self.info.context_length, cfg.context_length or self.info.context_length
        )
        self.placeholder_ids: dict[str, int] = {}
        if self.info.image is not None and self.info.has_vision_tower:
            self.placeholder_ids[T.IMAGE] = self.info.image.placeholder
        if self.info.audio is not None and self.info.has_audio_tower:
            self.placeholder_ids[T.AUDIO] = self.info.audio.placeholder
        self.worker = MLXWorker("decoder-mlx", max_queue=cfg.max_queue)
        self.runner = None
        self.dtype: str | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.worker.start(self._load_and_warm)

    async def wait_ready(self) -> None:
        await self.worker.wait_ready()

    def stop(self) -> None:
        self.worker.stop()

    def _load_and_warm(self):
        """MLX thread: load the language model only, then one short generation."""
        from decoder_service.model import LanguageModelRunner

        t0 = time.perf_counter()
        runner = LanguageModelRunner(Path(self.cfg.checkpoint))
        warm = resolve_sampling(
            T.SamplingParams(temperature=0.0, max_tokens=2),
            prompt_len=2, context_length=self.context_length, vocab_size=self.info.vocab_size,
            generation_config={}, suppressed_ids=[],
        )
        for _ in runner.generate([self.info.config.get("bos_token_id", 2) or 2, 10], [], warm):
            pass
        self.runner = runner
        self.dtype = runner.dtype
        log.info("decoder ready", checkpoint=self.cfg.checkpoint, dtype=runner.dtype,
                 lm_param_bytes=runner.param_bytes, eos=self.eos_ids,
                 load_s=round(time.perf_counter() - t0, 3))
        return runner

    # -- request path -----------------------------------------------------------
    def validate(
        self, ids: list[int], spans: list[tuple[T.Span, str, tuple[int, ...]]], sampling: T.SamplingParams
    ) -> ResolvedSampling:
        """Event loop: reject bad prompts before any bytes are buffered or MLX runs."""
        validate_prompt(
            ids,
            spans,
            placeholder_ids=self.placeholder_ids,
            vocab_size=self.info.vocab_size,
            hidden_size=self.info.hidden_size,
            context_length=self.context_length,
        )
        return resolve_sampling(
            sampling,
            prompt_len=len(ids),
            context_length=self.context_length,
            vocab_size=self.info.vocab_size,
            generation_config=self.info.generation_config,
            suppressed_ids=self.info.media_token_ids,
        )

    async def generate(
        self,
        ids: list[int],
        spans: list[T.SpanEmbedding],
        resolved: ResolvedSampling,
        extra_stop_ids: list[int],
    ) -> AsyncIterator[T.TokenEvent | T.Completion]:
        """Queue a generation and yield its events; cancelling the iterator stops it."""
        if self.runner is None:
            raise Unavailable("decoder is still loading")
        channel = TokenChannel(asyncio.get_running_loop(), self.cfg.stream_interval_ms / 1000.0)
        job = GenerationJob(
            ids=ids,
            spans=[SpanRows(s.span.offset, s.tensor.to_numpy(), s.tensor.dtype) for s in spans],
            sampling=resolved,
            stop_ids=frozenset(self.eos_ids) | frozenset(extra_stop_ids),
            soft_tokens=sum(s.span.length for s in spans),
            emit=channel.put,
        )
        fut = self.worker.submit(_run_generation, job, self.tokenizer)
        fut.add_done_callback(channel.wake)
        try:
            while True:
                batch = channel.drain() if fut.done() else await channel.get_batch()
                for ev in batch:
                    yield ev
                    if isinstance(ev, T.Completion):
                        return
                if not batch and fut.done():
                    fut.result()  # raises the MLX thread's error, if any
                    raise RuntimeError("generation ended without a completion event")
        finally:
            job.cancel.set()  # caller gone or done: the MLX thread stops at the next token


def _run_generation(runner, job: GenerationJob, tokenizer) -> None:
    """MLX thread: prefill, decode, stop at the full EOS set, stream events back."""
    started = time.perf_counter()
    queued_ms = (started - job.enqueued_at) * 1000.0
    if job.cancel.is_set():
        return
    detok = IncrementalDetokenizer(tokenizer)
    n = 0
    finish = "length"
    stop_id = None
    first_at = None
    gen = runner.generate(job.ids, job.spans, job.sampling)
    try:
        for tok in gen:
            if first_at is None:
                first_at = time.perf_counter()
            n += 1
            if tok in job.stop_ids:
                finish, stop_id = "stop", tok
                break
            job.emit(T.TokenEvent([tok], detok.add(tok)))
            if job.cancel.is_set():
                log.info("generation cancelled", tokens=n)
                return
            if n >= job.sampling.max_tokens:
                break
    finally:
        gen.close()
    tail = detok.flush()
    if tail:
        job.emit(T.TokenEvent([], tail))
    end = time.perf_counter()
    first_at = first_at or end
    job.emit(
        T.Completion(
            finish_reason=finish,
            prompt_tokens=len(job.ids),
            completion_tokens=n,
            soft_tokens=job.soft_tokens,
            queued_ms=queued_ms,
            prefill_ms=(first_at - started) * 1000.0,
            decode_ms=(end - first_at) * 1000.0,
            stop_token_id=stop_id,
        )
    )

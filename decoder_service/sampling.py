"""Turn a request's ``SamplingParams`` into the concrete values the loop uses.

Why: proto3 has no "unset" for scalars, so unset fields arrive as ``None``
and take the checkpoint's ``generation_config.json`` defaults (as mlx-vlm
does); out-of-range values are rejected with a message naming the field, and
prompt + max_tokens beyond the context is rejected with both numbers.
Bounds come from the model: a ``top_k`` at or above the vocabulary size
keeps every token, so it means the same as ``top_k = 0`` (off) and is
served as that, as vLLM does, rather than refused.
(Placeholder and media-boundary ids are suppressed by the model runner for
every sequence at once, not here.)  Pure Python, any thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmserve_core.wire.errors import InvalidArgument
from mmserve_core.wire.types import SamplingParams


@dataclass(frozen=True)
class ResolvedSampling:
    """A request's sampling with every default resolved (plain values: made on the event loop,
    read on the MLX thread)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    max_tokens: int
    seed: int | None
    logit_bias: dict[int, float]
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: object = None  # a constraints.GrammarMask for this sequence (its own matcher), or None
    thought_budget: object = None  # a thought_budget.ThoughtBudget for this sequence, or None

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


def resolve_sampling(
    s: SamplingParams,
    *,
    prompt_len: int,
    context_length: int,
    vocab_size: int,
    generation_config: dict,
) -> ResolvedSampling:
    temperature, top_p, top_k, min_p = _filters(s, vocab_size, generation_config)  # checked in this order,
    max_tokens = _max_tokens(s, prompt_len, context_length)                        # so the first error
    bias = _logit_bias(s, vocab_size)                                              # reported stays the same
    _check_penalties(s)
    _check_stops(s, vocab_size)
    return ResolvedSampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        max_tokens=max_tokens,
        seed=s.seed,
        logit_bias=bias,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty or None,
        frequency_penalty=s.frequency_penalty or None,
        stop_strings=tuple(s.stop),
        logprobs=bool(s.logprobs),
        top_logprobs=int(s.top_logprobs),
    )


def _filters(s: SamplingParams, vocab_size: int, generation_config: dict) -> tuple[float, float, int, float]:
    """Temperature, top-p, top-k, min-p: the request's, else ``generation_config.json``'s."""
    if s.temperature is not None:
        temperature = float(s.temperature)
    elif generation_config.get("do_sample") is False:
        temperature = 0.0
    else:
        temperature = float(generation_config.get("temperature", 1.0) or 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {s.temperature}")
    top_p = float(s.top_p if s.top_p is not None else generation_config.get("top_p", 1.0) or 1.0)
    if not (0.0 < top_p <= 1.0):
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    top_k = int(s.top_k if s.top_k is not None else generation_config.get("top_k", 0) or 0)
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
    if top_k >= vocab_size:  # keeps every token: the same distribution as no top-k (vLLM does the same)
        top_k = 0
    min_p = float(s.min_p or 0.0)
    if not (0.0 <= min_p <= 1.0):
        raise InvalidArgument(f"min_p must be in [0, 1], got {min_p}")
    return temperature, top_p, top_k, min_p


def _max_tokens(s: SamplingParams, prompt_len: int, context_length: int) -> int:
    room = context_length - prompt_len
    if s.max_tokens is None:
        return room
    if s.max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {s.max_tokens}")
    if s.max_tokens > room:
        raise InvalidArgument(
            f"prompt ({prompt_len} tokens) + max_tokens ({s.max_tokens}) = "
            f"{prompt_len + s.max_tokens} exceeds the context length of {context_length}"
        )
    return int(s.max_tokens)


def _logit_bias(s: SamplingParams, vocab_size: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for tok, val in s.logit_bias.items():
        if not (0 <= tok < vocab_size):
            raise InvalidArgument(f"logit_bias: token id {tok} is outside the vocabulary [0, {vocab_size})")
        if not math.isfinite(val):
            raise InvalidArgument(f"logit_bias[{tok}] must be finite, got {val}")
        bias[int(tok)] = float(val)
    return bias


def _check_penalties(s: SamplingParams) -> None:
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        v = getattr(s, name)
        if v is not None and not math.isfinite(v):
            raise InvalidArgument(f"{name} must be finite, got {v}")
    if s.repetition_penalty is not None and s.repetition_penalty <= 0:
        raise InvalidArgument(f"repetition_penalty must be > 0, got {s.repetition_penalty}")


def _check_stops(s: SamplingParams, vocab_size: int) -> None:
    for tok in s.stop_token_ids:
        if not (0 <= tok < vocab_size):
            raise InvalidArgument(f"stop_token_ids: {tok} is outside the vocabulary [0, {vocab_size})")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    if any(not x for x in s.stop):
        raise InvalidArgument("stop: stop strings must be non-empty")
    if not (0 <= s.top_logprobs <= MAX_TOP_LOGPROBS):
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {s.top_logprobs}")
    if s.top_logprobs and not s.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs to be true")

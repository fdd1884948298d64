"""Per-request samplers and logits processors for the batched decode (MLX only).

Why: sequences sharing decode steps each keep their own sampling settings.
mlx-lm's ``BatchGenerator`` takes one sampler and one processor list per
sequence, so we build them here from ``ResolvedSampling`` with mlx-vlm's own
building blocks (the same functions ``mlx_vlm.generate_step`` uses, so greedy
output matches the reference).  A request with a seed gets its own PRNG key
stream: its samples do not depend on what else is in the batch, so the same
seed gives the same output however busy the server is.  ``token_logprob`` reads a
sampled token's log-probability and its top alternatives for the response.

Thread ownership: build and call on the decoder's MLX thread.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_vlm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    clamp_temperature,
    make_logits_processors,
)

from decoder_service.sampling import ResolvedSampling
from mmserve_core.wire import types as T

Sampler = Callable[[mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


_SHARED: dict[tuple, Sampler] = {}


def build_sampler(s: ResolvedSampling) -> Sampler:
    """Filters in mlx-vlm's order (top-p, min-p, top-k), then a categorical draw.

    Unseeded samplers with equal settings are one shared object: mlx-lm samples
    a batch in one call when its rows share a sampler, row by row otherwise."""
    if s.temperature == 0:
        return greedy
    if s.seed is None:
        key = (s.temperature, s.top_p, s.top_k, s.min_p)
        if key not in _SHARED:
            if len(_SHARED) > 256:
                _SHARED.clear()
            _SHARED[key] = _make(s)
        return _SHARED[key]
    return _make(s)


def _make(s: ResolvedSampling) -> Sampler:
    inv_temp = 1.0 / clamp_temperature(s.temperature)
    methods = []
    if 0 < s.top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, s.top_p))
    if s.min_p:
        methods.append(lambda x: apply_min_p(x, s.min_p, 1))
    if s.top_k > 0:
        methods.append(lambda x: apply_top_k(x, s.top_k))
    key = [mx.random.key(int(s.seed))] if s.seed is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        for m in methods:
            logprobs = m(logprobs)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def build_processors(s: ResolvedSampling) -> list:
    """Logit bias and penalties over prompt + output, the thought budget, then the output
    constraint's mask (none of them: no per-row processing at all)."""
    processors = make_logits_processors(
        s.logit_bias or None,
        s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
    )
    if s.thought_budget is not None:
        processors = [*processors, s.thought_budget]
    if s.grammar is not None:
        processors = [*processors, s.grammar]
    return processors


def token_logprob(token: int, logprobs: mx.array, k: int) -> T.TokenLogprob:
    """The sampled token's log-probability and the ``k`` most likely tokens (best first)."""
    lp = logprobs.reshape(-1)
    top: list[tuple[int, float]] = []
    if k:
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx].tolist()
        top = sorted(zip(idx.tolist(), vals), key=lambda p: -p[1])
    return T.TokenLogprob(token, float(lp[token].item()), [(int(t), float(v)) for t, v in top])

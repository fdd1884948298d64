"""Prefix-cache entries where a conversation's next turn departs (``GenerateSetup.cache_point``).

Why: see ``prefix_cache`` ("Where the next turn departs"): on a checkpoint with sliding-window
layers, a prompt whose window wraps before its reply ends leaves a stored entry that cannot be
trimmed back to where turn 2 parts from it, so turn 2 reused nothing.  The scheduler asks here
where a prompt's prefill must end a chunk (``point``) and, when the prefill is done, stores the
entry cut back to that point (``keep``).  Only when needed: a prompt and its longest reply that fit
the window leave a final entry that trims back anyway (and then replaces this one).

Thread ownership: MLX thread only (the scheduler's).
"""

from __future__ import annotations

from decoder_service.prefix_cache import PrefixCache
from decoder_service.sequences import Sequence

MAX_SUFFIX = 256  # a point further than this before the prompt's end is not a generation prompt's: ignored


def point(seq: Sequence, prefix: PrefixCache, window: int | None) -> int:
    """Where this prompt's prefill ends a chunk and keeps an entry (0: nowhere)."""
    job = seq.job
    c, n = job.cache_point, len(job.ids)
    if not prefix.enabled or window is None or not seq.cached < c <= n or n - c > MAX_SUFFIX:
        return 0
    if n + job.sampling.max_tokens < window:  # the final entry will still trim back to it
        return 0
    return c


def keep(seq: Sequence, prefix: PrefixCache, window: int | None, cache: list, filled: int, metrics=None) -> None:
    """At the end of a prefill (``cache`` holds the prompt's first ``filled`` tokens): store the
    entry at the point (one token short of it where the prompt's last token is still to be fed)."""
    c = min(point(seq, prefix, window), filled)
    if c <= seq.cached:
        return
    stored = prefix.store_point(seq.kids, cache, filled, c)
    if metrics is not None:
        metrics.cache_points.labels(outcome="stored" if stored else "unavailable").inc()

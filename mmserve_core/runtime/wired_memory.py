"""Keeping a service's weights wired on Apple silicon (``mx.set_wired_limit``), as mlx-lm does.

Why: on a Mac, Metal may page a large model's buffers out under memory pressure, and a decode
step that waits for pages to come back runs at disk speed, not memory speed.  mlx-lm raises
the wired limit to the device's recommended working set while it generates
(``maybe_set_recommended_wired_limit``, ``wired_limit``); a service generates for its whole
life, so it sets the limit once after loading, says so, and warns — as mlx-lm does — when the
weights come near that size.  ``BatchGenerator`` sets and restores the same limit around its
own life; since the process baseline is already the recommended size, a generator that is
replaced (the scheduler builds a new one after a failed step) restores it, not zero.

Where the device reports no recommended working set (the CPU backend on Linux; checked here,
without a Mac) this is a no-op and logs that.  MLX thread, after the weights are evaluated.
"""

from __future__ import annotations

from mmserve_core.runtime.logs import get_logger

log = get_logger(__name__)


def wire_weights(weight_bytes: int, what: str) -> int | None:
    """Set the wired limit to the recommended working set; the limit, or None where there is none."""
    import mlx.core as mx

    recommended = mx.device_info().get("max_recommended_working_set_size")
    if not recommended:
        log.info("wired limit", applies=False, reason="the device reports no recommended working set",
                 device=str(mx.default_device()))
        return None
    mx.set_wired_limit(int(recommended))
    log.info("wired limit", bytes=int(recommended), weight_bytes=weight_bytes, what=what)
    if weight_bytes > 0.9 * recommended:
        log.warning("weights near the recommended working set: decode may page", weight_mb=weight_bytes >> 20,
                    recommended_mb=int(recommended) >> 20,
                    see="https://github.com/ml-explore/mlx-lm/tree/main#large-models (sysctl iogpu.wired_limit_mb)")
    return int(recommended)

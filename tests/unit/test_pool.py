"""Upstream pool picking: round-robin over healthy addresses, skipping tried and down ones."""

from __future__ import annotations

import pytest

from gateway.pool import UpstreamPool

pytestmark = pytest.mark.asyncio


async def test_round_robin_skips_down_and_tried():
    pool = UpstreamPool("encoder", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", lambda ch: None)
    try:
        assert [pool.pick().address[-1] for _ in range(6)] == list("123123")
        pool.record(pool.upstreams[1], "UNAVAILABLE")
        assert [pool.pick().address[-1] for _ in range(4)] == list("1331")  # "2" is down
        assert pool.pick(exclude={"127.0.0.1:1", "127.0.0.1:3"}).address == "127.0.0.1:2"  # down, but untried
        for u in pool.upstreams:
            pool.record(u, "UNAVAILABLE")
        assert pool.pick(exclude={"127.0.0.1:1"}).address in {"127.0.0.1:2", "127.0.0.1:3"}
    finally:
        await pool.close()

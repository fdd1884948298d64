"""Upstream pool picking: round-robin over healthy addresses, skipping tried and down ones."""

from __future__ import annotations

import pytest

from gateway.upstream.pool import UpstreamPool

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


async def test_a_conversation_key_sticks_to_one_replica_and_moves_only_when_it_is_down():
    pool = UpstreamPool("decoder", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", lambda ch: None)
    try:
        keys = [f"conversation {i}".encode() for i in range(300)]
        home = {k: pool.pick(key=k).address for k in keys}
        assert all(pool.pick(key=k).address == home[k] for k in keys)  # sticky, whatever round-robin did
        share = [list(home.values()).count(u.address) for u in pool.upstreams]
        assert min(share) > 60, share  # spread over all replicas
        pool.record(pool.upstreams[1], "UNAVAILABLE")
        moved = {k: pool.pick(key=k).address for k in keys}
        assert all(moved[k] != "127.0.0.1:2" for k in keys)
        assert all(moved[k] == home[k] for k in keys if home[k] != "127.0.0.1:2")  # nobody else moves
        k = next(k for k in keys if home[k] == "127.0.0.1:1")  # failover order for one key: home first
        assert pool.pick(exclude={"127.0.0.1:1"}, key=k).address != "127.0.0.1:1"
    finally:
        await pool.close()


def test_turns_of_one_conversation_share_a_key():
    from gateway.upstream.clients import conversation_key
    from mmserve_core.wire import types as T

    eot = {106}
    turn1 = [2, 105, 10, 11, 12, 106, 105, 20]  # <bos> <|turn>user ... <turn|> <|turn>model
    turn2 = turn1[:-1] + [20, 30, 31, 106, 105, 10, 40, 106, 105, 20]
    other = [2, 105, 10, 11, 99, 106, 105, 20]
    assert conversation_key(turn1, [], eot) == conversation_key(turn2, [], eot)
    assert conversation_key(turn1, [], eot) != conversation_key(other, [], eot)

    def img(h: str) -> T.SpanEmbedding:
        return T.SpanEmbedding(T.Span(3, 1, "image", h), None)

    assert conversation_key(turn1, [img("a")], eot) != conversation_key(turn1, [img("b")], eot)  # other picture

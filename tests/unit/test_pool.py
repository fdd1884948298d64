"""Upstream picking: the least busy healthy replica; a key's replica within the load bound; full and
down replicas passed over; the failover loop retrying full replicas elsewhere; conversation keys."""

from __future__ import annotations

import collections
import math
import time

import grpc
import pytest

from gateway.affinity import conversation_key
from gateway.upstream import clients
from gateway.upstream.pool import Lease, UpstreamPool
from mmserve_core.wire import types as T

ADDRS = "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"


@pytest.mark.asyncio
async def test_the_least_busy_healthy_replica_is_picked():
    pool = UpstreamPool("encoder", ADDRS, lambda ch: None)
    try:
        a, b, c = pool.upstreams
        leases = [Lease(a), Lease(a), Lease(b)]
        assert pool.pick() is c
        held = [Lease(c), Lease(c)]
        assert pool.pick() is b  # 2, 1, 2
        for lease in held:
            lease.release()
            lease.release()  # idempotent: a done-callback and an error path may both release
        assert c.outstanding == 0 and pool.pick() is c
        pool.record(c, "UNAVAILABLE")
        assert pool.pick() is b  # c is down
        assert pool.pick(exclude={b.address}) is a
        assert pool.pick(exclude={a.address, b.address}) is c  # down, but untried
        for u in pool.upstreams:
            pool.record(u, "UNAVAILABLE")
        assert pool.pick(exclude={a.address}).address in {b.address, c.address}
        for lease in leases:
            lease.release()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_ties_are_broken_at_random():
    pool = UpstreamPool("decoder", ADDRS, lambda ch: None)
    try:
        picks = collections.Counter(pool.pick().address for _ in range(300))
        assert len(picks) == 3 and min(picks.values()) > 50, picks
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_full_replica_is_passed_over_for_a_while():
    pool = UpstreamPool("decoder", "127.0.0.1:1,127.0.0.1:2", lambda ch: None)
    try:
        a, b = pool.upstreams
        held = Lease(b)  # b busier: a would be picked
        pool.record(a, "RESOURCE_EXHAUSTED")
        assert all(pool.pick() is b for _ in range(20))
        pool.record(b, "RESOURCE_EXHAUSTED")  # both full: the least busy again
        assert pool.pick() is a
        a.full_until = b.full_until = 0.0
        assert pool.pick() is a
        held.release()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_key_sticks_to_one_replica_and_moves_only_when_it_is_down():
    pool = UpstreamPool("decoder", ADDRS, lambda ch: None)
    try:
        keys = [f"conversation {i}".encode() for i in range(300)]
        home = {k: pool.pick(key=k).address for k in keys}
        assert all(pool.pick(key=k).address == home[k] for k in keys)  # sticky
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


@pytest.mark.asyncio
async def test_load_wins_over_affinity_past_the_bound():
    """Bounded loads: a key's replica keeps it while its load stays within ceil(1.25 x the mean,
    the new call counted); past that the next replica in the key's order takes the call."""
    pool = UpstreamPool("decoder", "127.0.0.1:1,127.0.0.1:2", lambda ch: None)
    try:
        key = b"one hot conversation"
        home = pool.pick(key=key)
        other = next(u for u in pool.upstreams if u is not home)
        leases = [Lease(home)]
        assert pool.pick(key=key) is home  # 1 vs 0: ceil(1.25 x 2 / 2) = 2 — still within
        leases.append(Lease(home))
        assert pool.pick(key=key) is other  # 2 vs 0: bound 2, a third would pass it
        leases += [Lease(other), Lease(other)]
        assert pool.pick(key=key) is home  # 2 vs 2: balanced again, affinity again
        for _ in range(40):  # one key, 40 concurrent calls: spread, not stacked
            leases.append(Lease(pool.pick(key=key)))
        total = home.outstanding + other.outstanding
        assert max(home.outstanding, other.outstanding) <= math.ceil(1.25 * total / 2), (home.outstanding, total)
        assert other.outstanding > 10  # without the bound all 40 would stack on the key's replica
        for lease in leases:
            lease.release()
        assert home.outstanding == other.outstanding == 0
    finally:
        await pool.close()


class _Err(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


@pytest.mark.asyncio
async def test_full_replicas_are_retried_elsewhere_then_429_only_when_all_stay_full(monkeypatch):
    monkeypatch.setattr(clients, "FULL_BACKOFF_S", 0.001)
    pool = UpstreamPool("decoder", "127.0.0.1:1,127.0.0.1:2", lambda ch: None)
    try:
        a, b = pool.upstreams
        for u in pool.upstreams:
            u.stub = u.address
        by_stub = {u.stub: u for u in pool.upstreams}
        full = {a.address}
        seen: list[str] = []

        async def attempt(stub, lease):
            u = by_stub[stub]
            seen.append(u.address)
            assert u.outstanding == 1  # the lease counts while the attempt runs
            if u.address in full:
                raise _Err(grpc.StatusCode.RESOURCE_EXHAUSTED)
            return u.address

        for _ in range(10):  # whatever the key prefers, b answers
            assert await clients._with_failover(pool, attempt, key=b"k") == b.address
        assert a.outstanding == b.outstanding == 0
        full.add(b.address)
        seen.clear()
        a.full_until = b.full_until = 0.0
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await clients._with_failover(pool, attempt)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(seen) == 2 * (clients.FULL_RETRY_ROUNDS + 1)  # every replica, every round

        async def fills_once(stub, lease):  # both full at first, room after one back-off
            seen.append(stub)
            if len(seen) <= 2:
                raise _Err(grpc.StatusCode.RESOURCE_EXHAUSTED)
            return "ok"

        seen.clear()
        assert await clients._with_failover(pool, fills_once) == "ok"

        async def refused(stub, lease):  # the request's own fault: never retried
            seen.append("x")
            raise _Err(grpc.StatusCode.INVALID_ARGUMENT)

        seen.clear()
        with pytest.raises(grpc.aio.AioRpcError):
            await clients._with_failover(pool, refused)
        assert seen == ["x"]
        assert a.outstanding == b.outstanding == 0
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_held_lease_lasts_until_the_call_ends():
    pool = UpstreamPool("decoder", "127.0.0.1:1", lambda ch: None)
    try:
        kept: list[Lease] = []

        async def attempt(stub, lease):
            kept.append(lease)
            return "stream"

        await clients._with_failover(pool, attempt, hold=True)
        assert pool.upstreams[0].outstanding == 1
        kept[0].release()
        assert pool.upstreams[0].outstanding == 0
    finally:
        await pool.close()


def _msg(role: str, text: str, media: bytes | None = None) -> T.Message:
    parts = [T.Part("text", "p", text=text)]
    if media is not None:
        parts.append(T.Part("image", "p", media=T.MediaInput("image", media)))
    return T.Message(role, parts, "m")


def test_turns_of_one_conversation_share_a_key_and_a_shared_system_prompt_does_not():
    system = _msg("system", "You are a helpful assistant. " * 20)
    tools = [T.Tool("get_weather", "weather", {"type": "object"}), T.Tool("get_time", "time", None)]
    turn1 = [system, _msg("user", "what is the weather in Paris?")]
    turn2 = [*turn1, _msg("assistant", "Sunny."), _msg("user", "and tomorrow?")]
    other = [system, _msg("user", "what time is it in Oslo?")]
    assert conversation_key(turn1, tools) == conversation_key(turn2, tools)
    assert conversation_key(turn1, tools) != conversation_key(other, tools)
    keys = {conversation_key([system, _msg("user", f"question {i}")], tools) for i in range(40)}
    assert len(keys) == 40  # one system prompt and tools, 40 conversations, 40 keys
    assert conversation_key(turn1, tools) != conversation_key(turn1, tools[:1])
    with_a = [system, _msg("user", "this picture", b"png a")]
    assert conversation_key(with_a) != conversation_key([system, _msg("user", "this picture", b"png b")])
    assert conversation_key(with_a) == conversation_key([*with_a, _msg("assistant", "ok"), _msg("user", "more")])
    # framing: moving text between parts changes the key
    assert conversation_key([_msg("user", "ab")]) != conversation_key([T.Message("user", [
        T.Part("text", "p", text="a"), T.Part("text", "p", text="b")], "m")])


@pytest.mark.asyncio
async def test_a_name_becomes_one_replica_per_address_and_follows_its_records(monkeypatch):
    from gateway.upstream import pool as pool_mod

    records = {"decoders.ns.svc": ["10.0.0.1:50052", "10.0.0.2:50052"]}

    async def fake_resolve(t):
        return list(records.get(t.host, []))

    monkeypatch.setattr(pool_mod, "resolve", fake_resolve)
    pool = UpstreamPool("decoder", "decoders.ns.svc:50052,127.0.0.1:9", lambda ch: None)
    try:
        assert [u.address for u in pool.upstreams] == ["decoders.ns.svc:50052", "127.0.0.1:9"]  # until resolved
        await pool.resolve()
        assert sorted(u.address for u in pool.upstreams) == ["10.0.0.1:50052", "10.0.0.2:50052", "127.0.0.1:9"]
        first = next(u for u in pool.upstreams if u.address == "10.0.0.1:50052")
        held = Lease(first)
        records["decoders.ns.svc"] = ["10.0.0.2:50052", "10.0.0.3:50052"]  # a pod replaced
        await pool.resolve()
        assert sorted(u.address for u in pool.upstreams) == ["10.0.0.2:50052", "10.0.0.3:50052", "127.0.0.1:9"]
        assert first in pool._retired  # its open call still runs; closed once it ends
        held.release()
        await pool.resolve()
        assert not pool._retired
        records["decoders.ns.svc"] = []  # DNS down: keep what we had
        await pool.resolve()
        assert len(pool) == 3
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_the_load_a_replica_reports_counts_other_gateways_calls():
    pool = UpstreamPool("decoder", "127.0.0.1:1,127.0.0.1:2", lambda ch: None)
    try:
        a, b = pool.upstreams
        mine = Lease(a)
        a.report("4/16")  # 4 in it before this call joined: 4 from other gateways
        assert a.others == 4 and a.load(time.monotonic()) == 5
        mine_b = [Lease(b), Lease(b)]
        assert pool.pick() is b  # 2 < 5: this gateway alone would have picked a (1 < 2)
        a.report("garbage")  # an older decoder says nothing: nothing changes
        assert a.others == 4
        b.report("15/16")
        assert b.full(time.monotonic()) and pool.pick() is a  # full by its own account
        a.reported_at = b.reported_at = time.monotonic() - 10  # stale: only this gateway's calls count
        assert a.load(time.monotonic()) == 1 and not b.full(time.monotonic())
        mine.release()
        for lease in mine_b:
            lease.release()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_conversations_are_placed_within_the_bound_whatever_the_hash_says():
    """40 new conversations one after another over two replicas, for 30 address pairs (the hash
    differs with every pair): never more than ceil(1.25 x 41 / 2) = 26 on one — rendezvous alone put
    28 on one in a measured run."""
    worst = 0
    for trial in range(30):
        pool = UpstreamPool("decoder", f"127.0.0.1:{2000 + trial},127.0.0.1:{3000 + trial}", lambda ch: None)
        try:
            homes = collections.Counter(pool.pick(key=f"conversation {trial}-{i}".encode()).address
                                        for i in range(40))
            worst = max(worst, max(homes.values()))
            again = collections.Counter(pool.pick(key=f"conversation {trial}-{i}".encode()).address
                                        for i in range(40))
            assert again == homes  # placed conversations stay
        finally:
            await pool.close()
    assert worst <= 26, worst


def test_homes_forget_the_least_recent_and_the_idle(monkeypatch):
    from gateway.upstream import homes as homes_mod

    h = homes_mod.Homes(max_keys=2, idle_s=100)
    h.place(b"a", "x")
    h.place(b"b", "x")
    h.place(b"c", "y")  # over the bound: "a" (least recently used) goes
    assert h.get(b"a") is None and h.count("x") == 1 and h.count("y") == 1
    h.place(b"c", "x")  # moved
    assert h.count("y") == 0 and h.count("x") == 2
    now = time.monotonic()
    monkeypatch.setattr(homes_mod.time, "monotonic", lambda: now + 1000)
    assert h.get(b"b") is None and len(h) == 0 and h.count("x") == 0

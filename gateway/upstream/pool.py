"""A pool of upstream replicas: the least busy healthy one, affinity within a load bound, failover.

Why: operators scale encoders and decoders on separate Macs; the gateway
takes a comma-separated list for each and must spread work across them, keep
a conversation where its KV is cached, and keep serving when one dies or is
full.  One grpc.aio channel per address; a background task asks each
``grpc.health.v1`` every ``interval`` seconds and a call that fails with
UNAVAILABLE marks its address down at once, so the next pick (and the
caller's retry) goes elsewhere.

How a replica is picked (``pick``):

* **Load**: every call this gateway has open on a replica counts against it
  (``Upstream.outstanding``, released when the RPC ends, however it ends).
  Without a key the least busy healthy replica wins (ties broken at random,
  so several gateways do not herd) — "least outstanding requests", better
  than power-of-two-choices for one gateway and the same for two replicas.
* **Affinity** (a conversation's key, or the client's ``prompt_cache_key``):
  rendezvous hashing orders the replicas per key, so every gateway sends a
  key to the same replica and losing one moves only its keys.  The first in
  that order within the **load bounds** wins: consistent hashing with bounded
  loads (Mirrokni, Thorup, Zadimoghaddam 2018, as HAProxy and Envoy apply it)
  — a replica is passed over while its calls in flight exceed ``load_factor``
  × the mean, so a busy replica sends the call to the next one in the key's
  order instead of queueing it (load wins over affinity); and a *new*
  conversation is placed only on a replica holding no more than
  ``load_factor`` × the mean number of conversations (``homes``), so chance
  cannot stack conversations on one replica.  A placed conversation stays.
* **Others' load**: a decoder's answer to each Generate carries its admission state
  (``LOAD_HEADER``: requests in it / its capacity), so the calls other gateways
  have open there count too for ``REPORT_FRESH_S`` after it was said.
* **Full**: a replica that answered RESOURCE_EXHAUSTED is passed over for
  ``FULL_HOLD_S`` (it has no room; the caller retries elsewhere), and so is one
  whose reported load has reached its capacity.

Picks skip down and full replicas; with none left they still try one (a probe
may be stale).  We pick ourselves rather than through gRPC's ``round_robin``
policy because we need each replica's load and a key's order, which a
channel's policy does not expose — hence also DNS names resolved here, one
replica per address (``resolve``).

Thread ownership: event-loop thread (channels bind to the running loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.upstream.homes import Homes
from gateway.upstream.resolve import RESOLVE_EVERY_S, parse_target, resolve
from mmserve_core.runtime.grpc_runtime import CHANNEL_OPTIONS
from mmserve_core.runtime.logs import get_logger

log = get_logger(__name__)

FULL_HOLD_S = 0.5  # a replica that said RESOURCE_EXHAUSTED is not picked again for this long (unless all are)
LOAD_FACTOR = 1.25  # the bounded-loads constant c: affinity holds while a replica's load <= c x the mean
REPORT_FRESH_S = 2.0  # a replica's reported load counts this long after it was said


@dataclass
class Upstream:
    address: str
    channel: grpc.aio.Channel
    stub: Any
    up: bool = True
    calls: int = 0
    failures: int = field(default=0)
    outstanding: int = 0  # calls this gateway has open on it (released when each RPC ends)
    full_until: float = 0.0  # monotonic time before which it is passed over (RESOURCE_EXHAUSTED)
    info: Any = None  # what it said of itself (decoders: GetModelInfo); forgotten when it goes down
    others: int = 0  # calls in it that are not this gateway's (other gateways), as it last reported
    capacity: int = 0  # how many calls it holds at most, as it last reported (0: never said)
    reported_at: float = -math.inf  # when it last reported its load (``LOAD_HEADER``)
    refused: str | None = None  # why this gateway never routes to it (``replicas``), None = it may

    def fresh(self, now: float) -> bool:
        return now - self.reported_at < REPORT_FRESH_S

    def load(self, now: float) -> int:
        """Its calls from this gateway, plus the others it reported lately."""
        return self.outstanding + (self.others if self.fresh(now) else 0)

    def full(self, now: float) -> bool:
        if now < self.full_until:
            return True
        return self.capacity > 0 and self.fresh(now) and self.load(now) >= self.capacity

    def report(self, header: str | None) -> None:
        """Its admission state from a Generate's response headers (``in_system/capacity``, counted
        before this call joined it); ignored when absent or malformed (older decoders)."""
        try:
            in_system, capacity = (int(x) for x in (header or "").split("/"))
        except ValueError:
            return
        self.others = max(0, in_system - (self.outstanding - 1))
        self.capacity, self.reported_at = capacity, time.monotonic()


class Lease:
    """One call's claim on a replica's load: ``release`` (idempotent) when the RPC has ended."""

    __slots__ = ("upstream", "_released")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream, self._released = upstream, False
        upstream.outstanding += 1

    def release(self, *_: Any) -> None:
        if not self._released:
            self._released = True
            self.upstream.outstanding -= 1


class UpstreamPool:
    def __init__(self, name: str, addresses: str, make_stub: Callable[[grpc.aio.Channel], Any],
                 *, health_interval_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None,
                 load_factor: float = LOAD_FACTOR) -> None:
        self.name = name
        self.targets = [parse_target(a) for a in addresses.split(",") if a.strip()]
        if not self.targets:
            raise ValueError(f"no {name} address given")
        self.upstreams: list[Upstream] = []
        self.load_factor = load_factor
        self._make_stub, self._credentials = make_stub, credentials
        self._from: dict[str, str] = {}  # replica address -> the configured name it was resolved from
        self._retired: list[Upstream] = []  # resolved away, closed once their calls have ended
        for t in self.targets:  # as configured until names are resolved (``start``)
            self.upstreams.append(self._upstream(t.spec))
        self._interval = health_interval_s
        self._task: asyncio.Task | None = None
        self._rng = random.Random()
        self.homes = Homes()  # where each recent conversation lives (bounded loads over conversations)
        self.on_call: Callable[[str, str, str], None] | None = None  # (service, address, outcome)

    def _upstream(self, addr: str, authority: str | None = None) -> Upstream:
        """A replica's channel.  round_robin inside it too: a name gRPC resolves itself (one not yet
        resolved here) spreads over its records.  gRPC's own client-side health checking
        (``healthCheckConfig``: the channel watches ``grpc.health.v1`` and sends only to a serving
        backend) reacts within the channel at once — a draining decoder's NOT_SERVING stops new
        calls before the next poll.  A replica that comes back must rejoin within a health interval
        or two, not after gRPC's default reconnect backoff (which grows to 120 s while a host is
        down).  ``authority``: the name a resolved address was found under, which TLS verifies."""
        options = [*CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                                       "healthCheckConfig": {"serviceName": ""}}))]
        if authority is not None:
            options += [("grpc.default_authority", authority), ("grpc.ssl_target_name_override",
                                                                authority.rpartition(":")[0])]
        ch = (grpc.aio.secure_channel(addr, self._credentials, options=options) if self._credentials is not None
              else grpc.aio.insecure_channel(addr, options=options))
        return Upstream(addr, ch, self._make_stub(ch))

    def __len__(self) -> int:
        return len(self.upstreams)

    def start(self) -> None:
        if len(self.upstreams) > 1 or any(t.resolvable for t in self.targets):
            self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for u in [*self.upstreams, *self._retired]:
            await u.channel.close()

    async def resolve(self) -> None:
        """Each DNS name's addresses as replicas (``resolve``): new addresses join, vanished ones are
        retired (no new calls; closed when their open calls end).  A name that does not resolve, or
        to one address, keeps its configured replica."""
        for t in (t for t in self.targets if t.resolvable):
            addrs = await resolve(t)
            mine = [u for u in self.upstreams if self._from.get(u.address) == t.spec or u.address == t.spec]
            if len(addrs) < 2 and not any(u.address != t.spec for u in mine):
                continue  # one address or none: the name as configured (its channel resolves it)
            if not addrs:
                continue  # resolution failed: keep what we had
            have = {u.address for u in mine}
            for a in addrs:
                if a not in have:
                    u = self._upstream(a, authority=f"{t.host}:{t.port}")
                    self._from[a] = t.spec
                    self.upstreams.append(u)
                    log.info("upstream replica found", service=self.name, name=t.spec, address=a)
            for u in mine:
                if u.address not in addrs:
                    self.upstreams.remove(u)
                    self._retired.append(u)
                    log.info("upstream replica gone", service=self.name, name=t.spec, address=u.address)
        for u in [u for u in self._retired if u.outstanding == 0]:
            self._retired.remove(u)
            await u.channel.close()

    def pick(self, exclude: set[str] = frozenset(), key: bytes | None = None,
             eligible: Callable[[Upstream], bool] | None = None) -> Upstream | None:
        """The replica for the next call (see the module's docstring): ``eligible``, healthy, not
        full, not in ``exclude``; the least busy, or with ``key`` the first in the key's order within
        the load bound.  With every replica down or full, one not yet tried (a probe may be stale);
        None when no eligible one is left."""
        now = time.monotonic()
        fresh = [u for u in self.upstreams if u.address not in exclude and (eligible is None or eligible(u))]
        if not fresh:
            return None
        ready = [u for u in fresh if u.up and not u.full(now)] or [u for u in fresh if u.up] or fresh
        if key is None or len(ready) == 1:
            least = min(u.load(now) for u in ready)
            return self._rng.choice([u for u in ready if u.load(now) == least])
        # the paper's capacity: ceil(c x (load + the call being placed) / replicas), for calls in flight
        # and for conversations placed (``homes``) — an idle, balanced pool always keeps affinity
        bound = math.ceil(self.load_factor * (sum(u.load(now) for u in ready) + 1) / len(ready))
        home = self.homes.get(key)
        placed = next((u for u in ready if u.address == home), None)
        if placed is not None and placed.load(now) + 1 <= bound:
            return placed
        held = math.ceil(self.load_factor * (sum(self.homes.count(u.address) for u in ready) + 1) / len(ready))
        for u in self._order(ready, key):
            if u.load(now) + 1 <= bound and (placed is not None or self.homes.count(u.address) + 1 <= held):
                if placed is None:  # new, or its decoder is gone: it lives here now
                    self.homes.place(key, u.address)
                return u  # else: its decoder is busy; this call only is diverted
        u = min(ready, key=lambda u: u.load(now))
        if placed is None:
            self.homes.place(key, u.address)
        return u

    @staticmethod
    def _order(upstreams: list[Upstream], key: bytes | None) -> list[Upstream]:
        """Rendezvous order for ``key`` (highest score first); as listed without one."""
        if key is None:
            return list(upstreams)
        return sorted(upstreams, reverse=True,
                      key=lambda u: hashlib.blake2b(key + u.address.encode(), digest_size=8).digest())

    def record(self, u: Upstream, outcome: str) -> None:
        """Count a call; UNAVAILABLE marks the address down until its next good health check,
        RESOURCE_EXHAUSTED passes it over for ``FULL_HOLD_S``."""
        u.calls += 1
        if outcome == "UNAVAILABLE":
            u.failures += 1
            if u.up:
                log.warning("upstream down", service=self.name, address=u.address)
            u.up, u.info = False, None  # it may come back as another version: described again
        elif outcome == "RESOURCE_EXHAUSTED":
            u.full_until = time.monotonic() + FULL_HOLD_S
        if self.on_call is not None:
            self.on_call(self.name, u.address, outcome)

    async def check(self, u: Upstream) -> str:
        try:
            r = await health_pb2_grpc.HealthStub(u.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(2.0, self._interval))
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"

    async def health(self) -> str:
        """SERVING if any address serves; otherwise the first one's status."""
        states = await asyncio.gather(*(self.check(u) for u in self.upstreams))
        return "SERVING" if "SERVING" in states else states[0]

    async def _watch(self) -> None:
        resolved_at = -math.inf
        while True:
            if time.monotonic() - resolved_at >= RESOLVE_EVERY_S and any(t.resolvable for t in self.targets):
                await self.resolve()
                resolved_at = time.monotonic()
            ups = list(self.upstreams)
            states = await asyncio.gather(*(self.check(u) for u in ups))
            for u, s in zip(ups, states):
                up = s == "SERVING"
                if up != u.up:
                    log.info("upstream " + ("up" if up else "down"), service=self.name, address=u.address, status=s)
                    if not up:
                        u.info = None
                u.up = up
            await asyncio.sleep(self._interval)

"""A pool of upstream addresses: round-robin over the healthy ones, with failover.

Why: operators scale encoders and decoders on separate Macs; the gateway
takes a comma-separated list for each and must spread work across them and
keep serving when one dies.  One grpc.aio channel per address; a background
task asks each ``grpc.health.v1`` every ``interval`` seconds and a call that
fails with UNAVAILABLE marks its address down at once, so the next pick (and
the caller's retry) goes elsewhere.  Picks skip down addresses; with none up
they still try (a probe may be stale).  We round-robin ourselves rather than
through gRPC's ``round_robin`` policy because that needs literal IPs in one
target, while operators write host names.

Thread ownership: event-loop thread (channels bind to the running loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve_core.runtime.grpc_runtime import CHANNEL_OPTIONS
from mmserve_core.runtime.logs import get_logger

log = get_logger(__name__)


@dataclass
class Upstream:
    address: str
    channel: grpc.aio.Channel
    stub: Any
    up: bool = True
    calls: int = 0
    failures: int = field(default=0)


class UpstreamPool:
    def __init__(self, name: str, addresses: str, make_stub: Callable[[grpc.aio.Channel], Any],
                 *, health_interval_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.name = name
        addrs = [a.strip() for a in addresses.split(",") if a.strip()]
        if not addrs:
            raise ValueError(f"no {name} address given")
        self.upstreams = []
        # round_robin inside each channel too: a name with several records (a Kubernetes headless
        # Service) spreads over all of them, not just the first.
        # A replica that comes back must rejoin within a health interval or two, not after gRPC's
        # default reconnect backoff (which grows to 120 s while a host is down).
        options = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin"),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
        for a in addrs:
            ch = (grpc.aio.secure_channel(a, credentials, options=options) if credentials is not None
                  else grpc.aio.insecure_channel(a, options=options))
            self.upstreams.append(Upstream(a, ch, make_stub(ch)))
        self._rr = itertools.cycle(range(len(self.upstreams)))
        self._interval = health_interval_s
        self._task: asyncio.Task | None = None
        self.on_call: Callable[[str, str, str], None] | None = None  # (service, address, outcome)

    def __len__(self) -> int:
        return len(self.upstreams)

    def start(self) -> None:
        if len(self.upstreams) > 1:
            self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for u in self.upstreams:
            await u.channel.close()

    def pick(self, exclude: set[str] = frozenset(), key: bytes | None = None) -> Upstream:
        """The next address in round-robin order that is up and not excluded.

        With ``key`` (a conversation's affinity key), the order is rendezvous
        hashing instead: every gateway sends the same key to the same replica
        while it is up, and when it is not, the keys it held spread over the
        rest (each key's next-highest score) without moving any other key."""
        if key is not None and len(self.upstreams) > 1:
            candidates = sorted(self.upstreams, reverse=True, key=lambda u: hashlib.blake2b(
                key + u.address.encode(), digest_size=8).digest())
        else:
            start = next(self._rr)
            candidates = self.upstreams[start:] + self.upstreams[:start]
        for u in candidates:
            if u.up and u.address not in exclude:
                return u
        for u in candidates:  # nothing known up: try one we have not tried
            if u.address not in exclude:
                return u
        return candidates[0]

    def record(self, u: Upstream, outcome: str) -> None:
        """Count a call; UNAVAILABLE marks the address down until its next good health check."""
        u.calls += 1
        if outcome == "UNAVAILABLE":
            u.failures += 1
            if u.up:
                log.warning("upstream down", service=self.name, address=u.address)
            u.up = False
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
        while True:
            states = await asyncio.gather(*(self.check(u) for u in self.upstreams))
            for u, s in zip(self.upstreams, states):
                up = s == "SERVING"
                if up != u.up:
                    log.info("upstream " + ("up" if up else "down"), service=self.name, address=u.address, status=s)
                u.up = up
            await asyncio.sleep(self._interval)

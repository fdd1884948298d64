"""What each decoder replica is: its ``GetModelInfo``, whether this gateway may route to it, what it can do.

Why: a gateway in front of several decoders must not assume they are alike.  During a rollout
an older decoder sits beside a newer one; a mis-mounted volume gives one replica another
tokenizer.  So every replica is described on its own (``GetModelInfo``, once per time it comes
up) and judged:

* **Refused** when its tokenizer or chat template digest differs from the gateway's own — the
  gateway's ids would be other text to it (answers garbage with a 200).  Logged once, shown by
  ``/health``, never routed to.  A decoder older than contract 1.5 declares no digests: it is
  accepted with a warning (mixed versions must still meet), its context length and ids checked
  as before.
* **Capabilities**: a request that needs one (a constraint, a thought budget, logprobs, a
  priority, video) goes only to replicas that declare it; when none does, the client gets 503
  naming the capability and the field that needs it — never a replica that would refuse or ignore
  it.  Older decoders are credited with what every version honoured (``IMPLICIT``).

Event-loop thread (the gateway's); no MLX.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from gateway.upstream.pool import Upstream, UpstreamPool
from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire import types as T

log = get_logger(__name__)

# what a decoder without contract_version (before 1.5) honoured without declaring it
IMPLICIT = frozenset({"constraints", "logprobs", "thought_budget"})


def capabilities(info: T.ModelInfo) -> frozenset[str]:
    """What a replica declared; for one older than contract 1.5, also what every version honoured
    (and video where it has video placeholders)."""
    if info.contract_version:
        return info.capabilities
    return info.capabilities | IMPLICIT | ({"video"} if T.VIDEO in info.media_tokens else frozenset())


class NoReplica(grpc.aio.AioRpcError):
    """No healthy replica can take the request: UNAVAILABLE (503) with why, where the calls' own
    errors are raised, so every front maps it like a replica that is down."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class Replicas:
    """The decoder pool's replicas as described by themselves, judged against ``expect``
    (the gateway's tokenizer and template digests; None = accept any)."""

    def __init__(self, pool: UpstreamPool, describe: Callable[[Upstream], Awaitable[T.ModelInfo]],
                 expect: tuple[str, str] | None = None) -> None:
        self.pool = pool
        self._describe = describe
        self.expect = expect
        self._inflight: dict[str, asyncio.Task] = {}

    async def refresh(self) -> None:
        """Describe every replica not yet described that is up (all of them when none is known:
        health may be stale); concurrent callers share one ``GetModelInfo`` per replica."""
        ups = self.pool.upstreams
        todo = [u for u in ups if u.info is None and u.up]
        if not todo and not any(u.info is not None for u in ups):
            todo = [u for u in ups if u.info is None]
        if not todo:
            return
        tasks = []
        for u in todo:
            t = self._inflight.get(u.address)
            if t is None or t.done():
                t = self._inflight[u.address] = asyncio.ensure_future(self._one(u))
            tasks.append(t)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, u: Upstream) -> None:
        try:
            info = await self._describe(u)
        except grpc.aio.AioRpcError as e:
            self.pool.record(u, e.code().name)
            return
        u.refused = self.judge(info)
        if u.refused:
            log.error("decoder refused: it reads prompts differently", address=u.address, why=u.refused)
        elif not info.contract_version:
            log.warning("decoder predates contract 1.5: its tokenizer and template cannot be checked",
                        address=u.address)
        u.info = info

    def judge(self, info: T.ModelInfo) -> str | None:
        """Why this gateway must not route to a replica described by ``info`` (None: it may)."""
        if self.expect is None or not info.contract_version:
            return None
        tok, tmpl = self.expect
        why = []
        if info.tokenizer_digest != tok:
            why.append(f"its tokenizer differs ({info.tokenizer_digest[:19]}..., this gateway's {tok[:19]}...)")
        if info.chat_template_digest != tmpl:
            why.append(f"its chat template differs ({info.chat_template_digest[:19]}..., this gateway's "
                       f"{tmpl[:19]}...)")
        return "; ".join(why) or None

    def eligible(self, needs: frozenset[str] = frozenset()) -> Callable[[Upstream], bool]:
        return lambda u: u.info is not None and u.refused is None and needs <= capabilities(u.info)

    def first_info(self) -> T.ModelInfo:
        """A routable replica's model facts (the first in the configured order), or ``NoReplica``."""
        ok = self.eligible()
        for u in self.pool.upstreams:
            if ok(u):
                return u.info
        raise NoReplica(self.why_none())

    def check(self, needs: dict[str, str]) -> None:
        """``needs``: capability → the request field that needs it.  ``NoReplica`` naming what is
        missing when no routable replica declares all of them."""
        if not needs:
            return
        routable = [u for u in self.pool.upstreams if self.eligible()(u)]
        if not routable:
            raise NoReplica(self.why_none())
        if any(set(needs) <= capabilities(u.info) for u in routable):
            return
        missing = sorted({c for u in routable for c in needs if c not in capabilities(u.info)})
        fields = ", ".join(f"{c} (for {needs[c]})" for c in missing)
        raise NoReplica(f"no decoder serving this model supports {fields}: the decoders are a version "
                        "without it, or were started without it")

    def why_none(self) -> str:
        refused = [f"{u.address}: {u.refused}" for u in self.pool.upstreams if u.refused]
        if refused:
            return "no decoder reads prompts as this gateway does — " + "; ".join(refused)
        return "no decoder is reachable"

    def status(self) -> dict[str, str]:
        """Per replica: refused (with why), or what it declared (for ``/health``)."""
        out = {}
        for u in self.pool.upstreams:
            if u.refused:
                out[u.address] = "refused: " + u.refused
            elif u.info is not None:
                out[u.address] = f"contract {u.info.contract_version or '< 1.5'}; " + \
                                 ", ".join(sorted(capabilities(u.info)))
            else:
                out[u.address] = "not described yet" if u.up else "down"
        return out

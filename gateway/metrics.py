"""Prometheus metrics for the gateway (``prometheus_client``, its own registry).

Why: the gateway sees what clients see — HTTP statuses and the time until a
response starts (for streams, the first token).  Event-loop thread.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mmserve_gateway_chat_requests", "Chat completion requests by HTTP status",
                                ["status"], registry=r)
        self.upstream = Counter("mmserve_gateway_upstream_calls", "Calls to each upstream address, by outcome",
                                ["service", "address", "outcome"], registry=r)
        self.ttft = Histogram("mmserve_gateway_time_to_first_token_seconds",
                              "Request arrival to the first decoder message (media encoding included)",
                              buckets=_BUCKETS, registry=r)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

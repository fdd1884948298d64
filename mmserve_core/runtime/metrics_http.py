"""A model service's Prometheus metrics: the series every service has, and ``/metrics`` over HTTP.

Why: each service keeps its own ``CollectorRegistry`` (several engines in one test process never
collide) and starts it with the same series — the BLAS its MLX CPU work runs on, and its RPCs by
outcome — under its own prefix (``mmserve_encoder_…``, ``mmserve_decoder_…``); ``ServiceMetrics``
makes them once for both.  ``start_metrics_server`` exposes a registry on a port operators scrape;
``prometheus_client`` runs that HTTP server on a daemon thread, off the event loop and off the MLX
thread, and its metric objects are thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from mmserve_core.runtime.blas import blas_in_use


class ServiceMetrics:
    """The registry and series every model service has; ``service`` is its metric prefix, ``rpc``
    the RPC its requests counter counts."""

    def __init__(self, service: str, rpc: str) -> None:
        r = self.registry = CollectorRegistry()
        # which BLAS MLX's CPU work runs on (openblas / reference / accelerate): label, value 1
        Gauge(f"mmserve_{service}_blas", "The BLAS this process runs MLX's CPU work on", ["library"],
              registry=r).labels(blas_in_use()).set(1)
        self.requests = Counter(f"mmserve_{service}_requests", f"{rpc} RPCs by outcome (gRPC status name)",
                                ["outcome"], registry=r)

    def text(self) -> str:
        """The registry in Prometheus's text format (the ``/metrics`` body)."""
        return generate_latest(self.registry).decode()


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve ``/metrics`` on a daemon thread; returns the bound port (``port`` 0 = any free one)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])

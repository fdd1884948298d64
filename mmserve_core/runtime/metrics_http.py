"""Serve a Prometheus registry over HTTP (``/metrics``) beside a gRPC service.

Why: each service keeps its own ``CollectorRegistry``; this exposes one on a
port operators scrape.  ``prometheus_client`` runs the HTTP server on a
daemon thread, off the event loop and off the MLX thread.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve ``/metrics`` on a daemon thread; returns the bound port (``port`` 0 = any free one)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])

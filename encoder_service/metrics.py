"""Prometheus metrics for the encoder (``prometheus_client``, its own registry).

Why: operators scale encoders on their own machines and need to see what
each one does — outcomes, latency per modality, cache effectiveness, queue
depth and batch sizes — without scraping logs.  ``prometheus_client`` is the
reference client library; its metric objects are thread-safe, so the MLX
thread records batch sizes directly.  One ``EncoderMetrics`` per engine, each
with its own registry, so several engines in one test process never collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from mmserve_core.runtime.metrics_http import ServiceMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EncoderMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("encoder", "Encode")
        r = self.registry
        self.items = Counter("mmserve_encoder_items", "Media items encoded, by modality and source",
                             ["modality", "source"], registry=r)
        self.item_latency = Histogram("mmserve_encoder_item_seconds",
                                      "Time from request arrival to an item's embedding being ready",
                                      ["modality"], buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("mmserve_encoder_request_seconds", "Whole Encode RPC time",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("mmserve_encoder_cache_hits", "Content-cache hits", registry=r)
        self.cache_misses = Counter("mmserve_encoder_cache_misses", "Content-cache misses", registry=r)
        self.cache_evictions = Gauge("mmserve_encoder_cache_evictions", "Entries evicted so far", registry=r)
        self.cache_bytes = Gauge("mmserve_encoder_cache_bytes", "Embedding bytes held by the cache", registry=r)
        self.cache_entries = Gauge("mmserve_encoder_cache_entries", "Entries held by the cache", registry=r)
        self.queue_depth = Gauge("mmserve_encoder_queue_depth", "Tower inputs waiting for the MLX thread",
                                 registry=r)
        self.batch_size = Histogram("mmserve_encoder_batch_size", "Tower inputs per forward pass",
                                    ["modality"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.embedding_bytes = Counter("mmserve_encoder_embedding_bytes", "Embedding bytes sent", registry=r)

    def bind(self, queue_depth: Callable[[], int], cache) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.cache_bytes.set_function(lambda: cache.bytes)
        self.cache_entries.set_function(lambda: len(cache))
        self.cache_evictions.set_function(lambda: cache.stats.evictions)

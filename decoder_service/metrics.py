"""Prometheus metrics for the decoder (``prometheus_client``, its own registry).

Why: operators size decoder machines by active sequences, queue depth,
tokens/s and time to first token.  Counters are bumped on the MLX thread
(``prometheus_client`` is thread-safe); gauges read the scheduler at scrape
time.  One ``DecoderMetrics`` per engine, so test processes never collide.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from mmserve_core.runtime.metrics_http import ServiceMetrics

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DecoderMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("decoder", "Generate")
        r = self.registry
        self.active = Gauge("mmserve_decoder_active_sequences",
                            "Decode slots taken: sequences decoding or prefilling to join the batch", registry=r)
        self.queue_depth = Gauge("mmserve_decoder_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.generated_tokens = Counter("mmserve_decoder_generated_tokens",
                                        "Tokens sampled (rate() = aggregate tokens/s)", registry=r)
        self.prompt_tokens = Counter("mmserve_decoder_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.prefix_hit_tokens = Counter("mmserve_decoder_prefix_cache_hit_tokens",
                                         "Prompt tokens served from the prefix cache", registry=r)
        self.prefix_cache_bytes = Gauge("mmserve_decoder_prefix_cache_bytes",
                                        "Prefix cache bytes under --prefix-cache-bytes (KV and index)", registry=r)
        self.prefix_cache_kv_bytes = Gauge("mmserve_decoder_prefix_cache_kv_bytes",
                                           "KV array bytes in the prefix cache (quantized with --kv-bits)", registry=r)
        self.prefix_cache_tokens = Gauge("mmserve_decoder_prefix_cache_tokens", "Tokens the prefix cache holds",
                                         registry=r)
        self.cache_points = Counter("mmserve_decoder_cache_points",
                                    "Prefix-cache entries asked for where a conversation's next turn departs "
                                    "(GenerateSetup.cache_point), by outcome: stored, or unavailable (the "
                                    "prefill's last chunk began after the point)", ["outcome"], registry=r)
        self.draft_tokens = Counter("mmserve_decoder_draft_tokens",
                                    "Tokens the MTP drafter proposed (--draft-model)", registry=r)
        self.draft_accepted_tokens = Counter("mmserve_decoder_draft_accepted_tokens",
                                             "Drafted tokens the target verified and emitted", registry=r)
        self.draft_rounds = Counter("mmserve_decoder_draft_rounds",
                                    "Verify forwards that carried drafts (accepted ÷ rounds + 1 = tokens a "
                                    "forward)", registry=r)
        self.draft_position = Counter("mmserve_decoder_draft_position_tokens",
                                      "Drafted tokens by their position in the round (1 = first draft)",
                                      ["position"], registry=r)
        self.draft_position_accepted = Counter("mmserve_decoder_draft_position_accepted_tokens",
                                               "Accepted drafted tokens by position (÷ the above = acceptance "
                                               "by draft position)", ["position"], registry=r)
        self.ttft = Histogram("mmserve_decoder_ttft_seconds", "Arrival to first sampled token",
                              buckets=_TTFT_BUCKETS, registry=r)

        self.open_streams = Gauge("mmserve_decoder_open_streams", "Generate RPCs open (sending or generating)",
                                  registry=r)
        self.stream_buffered_bytes = Gauge("mmserve_decoder_stream_reserved_bytes",
                                           "Embedding bytes reserved by streams still sending them", registry=r)
        self.streams_refused = Counter("mmserve_decoder_streams_refused",
                                       "Generate streams refused by a stream limit", ["limit"], registry=r)
        self.streams_idle_timeouts = Counter("mmserve_decoder_stream_idle_timeouts",
                                             "Generate streams ended by --stream-idle-timeout-s", registry=r)

    def bind_admission(self, admission) -> None:
        self.open_streams.set_function(lambda: admission.open_streams)
        self.stream_buffered_bytes.set_function(lambda: admission.reserved_bytes)

    def bind(self, scheduler) -> None:
        self.active.set_function(lambda: scheduler.active_count)
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.prefix_cache_bytes.set_function(lambda: scheduler.prefix.nbytes)
        self.prefix_cache_kv_bytes.set_function(lambda: scheduler.prefix.kv_bytes)
        self.prefix_cache_tokens.set_function(lambda: scheduler.prefix.tokens)

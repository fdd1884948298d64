"""Decoder settings: command-line flags with ``MMSERVE_DECODER_*`` env defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mmserve_core.runtime.flags import flag
from mmserve_core.runtime.service_main import ServiceSettings, parse_service_args


@dataclass(frozen=True)
class DecoderConfig(ServiceSettings):
    port: int = 50052
    max_queue: int = flag(64, "requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED")
    max_active: int = flag(16, "sequences decoding together in one batch", minimum=1)
    prefix_cache_bytes: int = flag(2 << 30, "KV bytes kept for prefix reuse across turns and requests (0 = off)")
    mlx_cache_bytes: int | None = flag(None, "bound MLX's cache of freed buffers (mx.set_cache_limit); "
                                             "unset = MLX's default", parse=int)
    context_length: int | None = flag(None, "cap the context below the checkpoint's max_position_embeddings",
                                      parse=int, minimum=1)
    stream_interval_ms: float = flag(10.0, "least time between two token messages of one stream; tokens "
                                           "generated in between travel together (0 = one message per token)")
    max_open_streams: int = flag(256, "Generate RPCs open at once, sending or generating; beyond it "
                                      "RESOURCE_EXHAUSTED")
    max_buffered_bytes: int = flag(1 << 30, "embedding bytes that streams still sending may hold together "
                                            "(reserved from each setup's declared spans); beyond it "
                                            "RESOURCE_EXHAUSTED")
    stream_idle_timeout_s: float = flag(30.0, "a Generate stream that sends nothing this long before closing "
                                              "its side ends with DEADLINE_EXCEEDED and frees what it buffered")
    prefill_budget_tokens: int = flag(512, "prompt tokens prefilled per decode step while other sequences "
                                           "decode (chunked prefill: bounds how long a long or a burst of "
                                           "prompts delays running streams)", minimum=1)
    kv_bits: int | None = flag(None, "quantize the full-attention KV to 4 or 8 bits (mlx's quantized "
                                     "caches): of the sequences decoding (the running batch and one alone) "
                                     "and of the prefix cache's entries — ~0.28x / 0.53x the bytes of bf16, "
                                     "so longer conversations fit and --prefix-cache-bytes keeps more of them; "
                                     "layers other layers or the drafter read stay full precision",
                               parse=int, choices=(4, 8))
    draft_model: str | None = flag(None, "a Gemma 4 MTP assistant checkpoint (gemma4_assistant / "
                                         "gemma4_unified_assistant) drafting tokens the LM verifies: same "
                                         "output, fewer LM forwards a token; checked against the checkpoint "
                                         "at start", parse=str)
    draft_block_size: int | None = flag(None, "tokens a drafting round verifies (1 + drafts); unset = the "
                                              "drafter's block_size; depth adapts per sequence below it",
                                        parse=int, minimum=2)
    draft_max_batch: int = flag(8, "with a drafter: the running batch drafts while it has at most this many "
                                   "rows (beyond, a step is plain: decode is no longer latency-bound)",
                                minimum=1)


def parse_args(argv: list[str] | None = None) -> DecoderConfig:
    return parse_service_args(DecoderConfig, "decoder", "checkpoint directory (config.json, safetensors, tokenizer files)", argv)

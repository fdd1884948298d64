"""The Gemma 4 language model alone: multimodal prefill, and the LM for batched decode (MLX only).

Why: the decoder must hold only the language model, yet produce exactly what
``mlx_vlm.generate`` produces on the whole checkpoint.  So:

* loading goes through mlx-vlm's ``load_model(lazy=True)`` (the real config,
  sanitize and quantization path); only ``language_model`` is kept and
  evaluated, so tower weights are never read from disk;
* prompt embeddings are built the way ``gemma4.Model.get_input_embeddings``
  builds them — token embeddings × ``embed_scale``, encoder rows written at the
  span positions, per-layer inputs computed from the ids with media positions
  zeroed (E2B/E4B), and ``mm_token_type_ids`` for checkpoints that attend
  bidirectionally over image blocks (26B-A4B, 31B);
* ``prefill`` takes the same steps ``mlx_vlm.generate_step`` takes before its
  first sample (chunking policy included); decoding then belongs to mlx-lm's
  ``BatchGenerator`` (see ``scheduler``), fed through ``logits_model``;
* ``prompt_features`` + ``prefill_chunk`` compute the same prompt a bounded
  chunk at a time (``media_prefill``: while other sequences decode), with
  bidirectional image blocks kept whole and exact at any cache offset.

Thread ownership: construct and call only on the decoder's MLX thread.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

_MX_DTYPE = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_HOLDER = {"bfloat16": mx.uint16, "float16": mx.float16, "float32": mx.float32}


@dataclass(frozen=True)
class SpanRows:
    """Soft-token rows for ``ids[offset:offset+rows]``; ``array`` holds the wire values (bfloat16 as its
    uint16 bit patterns, decoded to MLX on the MLX thread)."""

    offset: int
    array: np.ndarray  # [rows, hidden]; bfloat16 as uint16 bit patterns
    dtype: str
    modality: str = ""


@dataclass(frozen=True)
class _EmbeddingFeatures:
    inputs_embeds: mx.array
    per_layer_inputs: mx.array | None


@dataclass(frozen=True)
class PromptFeatures:
    """A media prompt's model inputs, built once and evaluated, for a prefill in chunks
    (``LanguageModelRunner.prefill_chunk``): each chunk slices them instead of rebuilding them."""

    input_ids: mx.array          # [1, T]
    inputs_embeds: mx.array      # [1, T, hidden]: soft tokens written in
    per_layer_inputs: mx.array | None  # [1, T, layers, ple] (E-series), media positions zeroed
    token_types: mx.array        # [1, T] mm_token_type_ids
    types: np.ndarray            # [T] the same, on the host (chunk planning)


class LanguageModelRunner:
    """Loads the LM of a Gemma 4 checkpoint and generates from prepared prompts."""

    def __init__(self, checkpoint: Path) -> None:
        import mlx_vlm.models.gemma4  # noqa: F401 - registers Gemma 4 classes
        from mlx.utils import tree_flatten
        from mlx_vlm.utils import load_model

        full = load_model(Path(checkpoint), lazy=True)
        self.config = full.config
        self.lm = full.language_model
        del full  # towers' lazy arrays are dropped unevaluated: never read from disk
        gc.collect()
        mx.eval(self.lm.parameters())
        self.param_bytes = sum(v.nbytes for _, v in tree_flatten(self.lm.parameters()))
        self.inner = self.lm.model
        self.dtype = next(
            (k for k, v in _MX_DTYPE.items() if v == self.inner.embed_tokens.weight.dtype), "float32"
        )
        if self.dtype == "float32" and hasattr(self.inner.embed_tokens, "scales"):
            self.dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(
                self.inner.embed_tokens.scales.dtype, "float32"
            )
        self.hidden_size = int(self.config.text_config.hidden_size)
        self.media_ids = [
            int(x)
            for x in (self.config.image_token_id, self.config.audio_token_id,
                      getattr(self.config, "video_token_id", None))
            if x is not None
        ]
        self.uses_ple = bool(self.inner.hidden_size_per_layer_input)
        # Placeholder and media-boundary ids can never be sampled: -inf on their logits,
        # added to every row of every step (one op for the batch, not a per-row processor).
        vocab = int(self.config.text_config.vocab_size)
        suppress = np.zeros((vocab,), np.float32)
        suppress[[t for t in self.media_ids + self._boundary_ids() if 0 <= t < vocab]] = -np.inf
        self.suppress = mx.array(suppress)
        self.bidirectional_vision = (
            getattr(self.config.text_config, "use_bidirectional_attention", None) == "vision"
        )

    # -- prompt ---------------------------------------------------------------
    def _prompt_features(self, ids: list[int], spans: list[SpanRows]):
        input_ids = mx.array(ids, dtype=mx.int32)[None]
        h = self.inner.embed_tokens(input_ids) * self.inner.embed_scale
        for s in spans:
            rows = mx.array(s.array).view(_MX_DTYPE[s.dtype]) if s.dtype == "bfloat16" else mx.array(s.array)
            h[:, s.offset : s.offset + rows.shape[0], :] = rows.astype(h.dtype)[None]
        ids_np = np.asarray(ids)
        per_layer = None
        if self.uses_ple:
            mm = np.isin(ids_np, self.media_ids)
            ple_ids = mx.array(np.where(mm, 0, ids_np).astype(np.int32))[None]
            per_layer = self.inner.get_per_layer_inputs(ple_ids)
        # Same convention as Gemma4Processor: image 1, video 2, audio 3.
        types = np.zeros_like(ids_np)
        cfg = self.config
        types[ids_np == cfg.image_token_id] = 1
        if getattr(cfg, "video_token_id", None) is not None:
            types[ids_np == cfg.video_token_id] = 2
        if cfg.audio_token_id is not None:
            types[ids_np == cfg.audio_token_id] = 3
        return input_ids, _EmbeddingFeatures(h, per_layer), mx.array(types.astype(np.int32))[None]

    def prompt_features(self, ids: list[int], spans: list[SpanRows]) -> PromptFeatures:
        """The prompt's inputs as ``prefill`` builds them, evaluated (a chunk slices them, so a lazy
        graph would be recomputed whole for every chunk)."""
        input_ids, feats, token_types = self._prompt_features(ids, spans)
        out = PromptFeatures(input_ids, feats.inputs_embeds, feats.per_layer_inputs, token_types,
                             np.asarray(token_types[0]))
        mx.eval([a for a in (out.input_ids, out.inputs_embeds, out.per_layer_inputs) if a is not None])
        return out

    def prefill_chunk(self, feats: PromptFeatures, cache: list, lo: int, hi: int, *, last: bool):
        """Run prompt positions ``lo:hi`` into ``cache`` (which holds ``[:lo]``); return the last
        position's logits (as ``prefill`` returns them) when ``last``, else None.

        Per-layer inputs are passed as the chunk's own rows (the LM would otherwise slice the whole
        prompt's at the cache offset).  On a checkpoint with bidirectional image attention, a chunk
        holding image blocks — whole: the caller never splits one — gets each block's overlay at any
        cache offset (``mlx_vlm_masks``), where mlx-vlm applies it only to a square mask."""
        from contextlib import nullcontext

        from mlx_vlm.generate.ar import generation_stream

        from decoder_service.mlx_vlm_masks import VISUAL_TYPES, block_overlay

        types = feats.token_types[:, lo:hi]
        kw = {"mm_token_type_ids": types}
        if feats.per_layer_inputs is not None:
            kw["per_layer_inputs"] = feats.per_layer_inputs[:, lo:hi]
        overlay = (self.bidirectional_vision and hi - lo > 1
                   and bool(np.isin(feats.types[lo:hi], VISUAL_TYPES).any()))
        with mx.stream(generation_stream):
            with block_overlay(self.inner, types) if overlay else nullcontext():
                out = self.lm(feats.input_ids[:, lo:hi], inputs_embeds=feats.inputs_embeds[:, lo:hi],
                              cache=cache, logits_to_keep=1, **kw)
            if not last:
                mx.eval([c.state for c in cache])
                return None
            logits = out.logits[:, -1, :]
            logits = logits + self.suppress.astype(logits.dtype)
            mx.eval(logits)
        return logits

    # -- batched serving --------------------------------------------------------------
    def prefill(self, ids: list[int], spans: list[SpanRows], *, cache: list | None = None, start: int = 0,
                prefill_step: int = 2048, point: int = 0, on_filled=None):
        """Run the prompt through the LM; return ``(cache, last_logits)``.

        The same steps ``mlx_vlm.generate_step`` takes before its first sample
        (chunks of the prompt then its last token, or one pass when the
        checkpoint's policy forbids chunking — bidirectional image blocks), so
        the first token matches the reference exactly.  With ``cache`` holding
        ``ids[:start]`` (a prefix-cache hit) only the rest is computed.  Media
        rows, per-layer inputs and ``mm_token_type_ids`` are only ever needed
        here: every later token is text, which the batch decode feeds by id.

        ``on_filled(cache, n)`` is called while the cache still holds the last multi-token pass as it
        left it (before the last token is fed alone: ``n = len(ids) - 1``; one pass: ``len(ids)``), and
        the chunks are laid so that pass starts at or before ``point`` (``cache_points``).
        """
        from mlx_vlm.generate.ar import generation_stream

        from decoder_service.text_prefill import chunk_width

        input_ids, feats, token_types = self._prompt_features(ids, spans)
        emb, input_ids = feats.inputs_embeds[:, start:], input_ids[:, start:]
        kw = {"mm_token_type_ids": token_types[:, start:]}
        if feats.per_layer_inputs is not None:
            kw["per_layer_inputs"] = feats.per_layer_inputs  # the LM slices it at the cache offset
        cache = cache if cache is not None else self.lm.make_cache()
        with mx.stream(generation_stream):
            chunked = self.lm.chunked_prefill_policy(
                input_ids=input_ids, inputs_embeds=emb, prompt_cache=cache, prefill_kwargs=kw)
            if chunked:
                pos = start
                while emb.shape[1] > 1:
                    n = min(chunk_width(pos, len(ids) - 1, prefill_step, point), emb.shape[1] - 1)
                    self.lm(inputs=input_ids[:, :n], inputs_embeds=emb[:, :n], cache=cache,
                            n_to_process=n, logits_to_keep=1, **kw)
                    mx.eval([c.state for c in cache])
                    emb, input_ids, pos = emb[:, n:], input_ids[:, n:], pos + n
                if on_filled is not None and pos > start:
                    on_filled(cache, pos)
            out = self.lm(input_ids, inputs_embeds=emb, cache=cache, logits_to_keep=1, **kw)
            logits = out.logits[:, -1, :]
            logits = logits + self.suppress.astype(logits.dtype)  # in the model dtype, as mlx-vlm's bias
            mx.eval(logits)
            if on_filled is not None and not chunked:
                on_filled(cache, len(ids))
        return cache, logits

    def logits_model(self):
        """The LM as mlx-lm's ``BatchGenerator`` calls it: ``(ids [B, 1], cache) -> logits``."""
        lm, suppress = self.lm, self.suppress

        def forward(inputs, cache=None, **kwargs):
            logits = lm(inputs, cache=cache, **kwargs).logits
            return logits + suppress.astype(logits.dtype)

        return forward

    def _boundary_ids(self) -> list[int]:
        cfg = self.config
        names = ("boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_id", "bov_token_id", "eov_token_id")
        return [int(getattr(cfg, n)) for n in names if getattr(cfg, n, None) is not None]

"""Gemma 4 vision and audio towers with their projectors, and nothing else (MLX only).

Why: the encoder is scaled out on its own machines, so it must never hold the
language model.  We load through mlx-vlm's own ``load_model`` — the exact code
path (config parsing, sanitize, quantization) a real checkpoint goes through —
with ``lazy=True``: safetensors arrays are file-backed until evaluated, so
keeping only ``vision_tower``/``embed_vision``/``audio_tower``/``embed_audio``
and evaluating just those means the language-model weights are never read.

Thread ownership: construct and call only on the encoder's MLX thread.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mmserve_common.errors import FailedPrecondition

_NP_TO_WIRE = {"bfloat16": mx.uint16, "float16": mx.float16, "float32": mx.float32}


@dataclass(frozen=True)
class Embedding:
    """Embedding rows as a numpy array holding the wire bytes of ``dtype``."""

    array: np.ndarray  # bfloat16 travels as uint16 bit patterns
    dtype: str


def _to_wire(x: mx.array, dtype: str) -> Embedding:
    target = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[dtype]
    x = x.astype(target)
    if dtype == "bfloat16":
        x = x.view(mx.uint16)
    mx.eval(x)
    return Embedding(np.array(x, copy=True), dtype)


class Towers:
    """The multimodal half of a Gemma 4 checkpoint."""

    def __init__(self, checkpoint: Path) -> None:
        import mlx_vlm.models.gemma4  # noqa: F401 - registers the Gemma 4 processor classes
        from mlx_vlm.utils import load_model, load_processor

        full = load_model(Path(checkpoint), lazy=True)
        self.config = full.config
        self.vision_tower = full.vision_tower
        self.embed_vision = full.embed_vision
        self.audio_tower = getattr(full, "audio_tower", None)
        self.embed_audio = getattr(full, "embed_audio", None)
        del full  # the language model's lazy arrays go unevaluated, never read from disk
        gc.collect()
        params = [self.vision_tower.parameters(), self.embed_vision.parameters()]
        if self.audio_tower is not None:
            params += [self.audio_tower.parameters(), self.embed_audio.parameters()]
        mx.eval(params)
        self.param_bytes = sum(v.nbytes for p in params for _, v in tree_flatten(p))
        self.dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}.get(
            self.embed_vision.embedding_projection.weight.dtype, "float32"
        )
        processor = load_processor(Path(checkpoint))
        self.image_processor = processor.image_processor
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.audio_ms_per_token = float(getattr(processor, "audio_ms_per_token", 40))
        self.audio_max_tokens = int(getattr(processor, "audio_seq_length", 750))
        self.sample_rate = int(getattr(self.feature_extractor, "sampling_rate", 16000))

    @property
    def has_audio(self) -> bool:
        return self.audio_tower is not None and self.feature_extractor is not None

    def preprocess_image(self, image) -> tuple[np.ndarray, int]:
        """PIL RGB image -> (pixel_values [1,3,H,W], soft-token count). CPU only."""
        data, n_soft = self.image_processor([image])
        return np.asarray(data["pixel_values"]), int(n_soft[0])

    def encode_image(self, pixel_values: np.ndarray, n_soft: int, dtype: str) -> Embedding:
        feats = self.embed_vision(self.vision_tower(mx.array(pixel_values)))
        if feats.shape[1] != n_soft:
            raise RuntimeError(f"vision tower gave {feats.shape[1]} rows, processor expected {n_soft}")
        return _to_wire(feats[0], dtype)

    def encode_audio(self, waveform: np.ndarray, n_tokens: int, dtype: str) -> Embedding:
        """Mono float32 waveform at ``sample_rate`` -> exactly ``n_tokens`` rows."""
        if not self.has_audio:
            raise FailedPrecondition("this checkpoint has no audio tower (audio_config is null)")
        fe = self.feature_extractor(
            [waveform], sampling_rate=self.sample_rate, return_attention_mask=True
        )
        feats = mx.array(np.stack(fe["input_features"]))
        valid = mx.array(np.stack(fe["input_features_mask"]))
        enc, pad_mask = self.audio_tower(feats, ~valid.astype(mx.bool_))
        emb = self.embed_audio(enc)
        n_valid = int((~pad_mask).sum().item())
        if n_valid < n_tokens:
            raise RuntimeError(
                f"audio tower produced {n_valid} valid rows for a clip needing {n_tokens} tokens"
            )
        return _to_wire(emb[0, :n_tokens], dtype)

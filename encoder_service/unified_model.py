"""The 12B unified (encoder-free) Gemma 4's media half: its small embedders, nothing else (MLX only).

Why a separate class: the unified model has no vision or audio tower.  An image goes in as raw
48×48-pixel model patches with their grid positions through ``vision_embedder`` (LayerNorm,
one dense layer, 2-D position embeddings) and ``embed_vision``; audio as raw 16 kHz samples,
640 a token (40 ms), straight into ``embed_audio``.  Each patch and each audio frame is embedded
on its own — nothing attends across them — so images padded to one budget, and clips padded to
one length, share a forward pass exactly; the rows kept are the real ones, in order, as
``mlx_vlm.models.gemma4_unified.Model.get_image_features`` / ``get_audio_features`` keep them.

Preprocessing is mlx-vlm's own unified processor (``Gemma4UnifiedImageProcessor``: the same
aspect-preserving resize as Gemma 4, then model patches; ``Gemma4UnifiedAudioFeatureExtractor``:
the waveform cut into 640-sample frames).  Its ``max_length`` counts *frames*, not samples, so
it is never passed: a block's length is bounded before the extractor sees it.

Thread ownership: construct and call ``encode_*`` only on the encoder's MLX thread; the
``preprocess_image`` / ``audio_features`` steps are numpy and run in the executor.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from encoder_service.model import AudioFeatures, Embedding, ImageInput, MediaModel, _to_wire
from mmserve_core.wire.errors import FailedPrecondition


class UnifiedEmbedders(MediaModel):
    """``vision_embedder`` + ``embed_vision`` and ``embed_audio`` of a ``gemma4_unified`` checkpoint."""

    MODULES = ("vision_embedder", "embed_vision", "embed_audio")

    @property
    def has_vision(self) -> bool:
        return (self.vision_embedder is not None and self.embed_vision is not None
                and self.image_processor is not None)

    @property
    def has_audio(self) -> bool:
        return self.embed_audio is not None and self.feature_extractor is not None

    # -- CPU preprocessing (any thread) -------------------------------------------
    def preprocess_image(self, image, soft_tokens: int | None = None) -> tuple[ImageInput, int]:
        """PIL RGB image -> (model patches padded to the budget + their positions, real patch count)."""
        kw = {"max_soft_tokens": soft_tokens} if soft_tokens else {}
        data, n_soft = self.image_processor([image], **kw)
        return (ImageInput(np.asarray(data["pixel_values"], np.float32), np.asarray(data["image_position_ids"])),
                int(n_soft[0]))

    def audio_features(self, waveform: np.ndarray) -> AudioFeatures:
        """Mono float32 clip (≤ one block) at 16 kHz -> 640-sample frames, the last zero-padded."""
        fe = self.feature_extractor([np.asarray(waveform, np.float32)])
        return AudioFeatures(np.asarray(fe["input_features"][0], np.float32),
                             np.asarray(fe["input_features_mask"][0], bool), waveform)

    # -- embedder passes (MLX thread) ----------------------------------------------
    def encode_images(self, images: list[ImageInput], rows: list[int], dtype: str) -> list[Embedding]:
        """One pass for images padded to the same budget -> each image's first ``rows[i]`` (real) rows."""
        if not self.has_vision:
            raise FailedPrecondition("this checkpoint has no vision embedder (vision_config is null)")
        pixels = mx.array(np.concatenate([im.pixels for im in images], axis=0))
        positions = mx.array(np.concatenate([im.positions for im in images], axis=0))
        feats = self.embed_vision(self.vision_embedder(pixels, positions))  # [B, budget, hidden]
        return [_to_wire(feats[i, :n], dtype) for i, n in enumerate(rows)]

    def encode_frames(self, frames: list[ImageInput], rows: list[int], dtype: str) -> list[Embedding]:
        """Video frames are images to the embedders (patches padded to the frame budget)."""
        return self.encode_images(frames, rows, dtype)

    def encode_audio(self, clips: list[AudioFeatures], n_tokens: list[int], dtype: str) -> list[Embedding]:
        """Clips' frames, zero-padded to one length -> exactly ``n_tokens[i]`` rows each (a row a frame)."""
        if not self.has_audio:
            raise FailedPrecondition("this checkpoint has no audio embedder (audio_config is null)")
        frames = max(c.features.shape[0] for c in clips)
        batch = np.zeros((len(clips), frames, clips[0].features.shape[1]), np.float32)
        for i, c in enumerate(clips):
            if c.features.shape[0] < n_tokens[i]:
                raise RuntimeError(f"{c.features.shape[0]} audio frames for a clip needing {n_tokens[i]} tokens")
            batch[i, : c.features.shape[0]] = c.features
        emb = self.embed_audio(mx.array(batch))  # [B, frames, hidden]
        return [_to_wire(emb[i, :n], dtype) for i, n in enumerate(n_tokens)]

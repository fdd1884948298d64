"""Gemma 4's media half — vision and audio towers with their projectors, or the unified model's
embedders (``unified_model``) — and nothing else (MLX only).

Why: the encoder is scaled out on its own machines, so it must never hold the
language model.  We load through mlx-vlm's own ``load_model`` — the exact code
path (config parsing, sanitize, quantization) a real checkpoint goes through —
with ``lazy=True``: safetensors arrays are file-backed until evaluated, so
keeping only ``vision_tower``/``embed_vision``/``audio_tower``/``embed_audio``
and evaluating just those means the language-model weights are never read.

Thread ownership: construct and call only on the encoder's MLX thread.
"""

from __future__ import annotations

import abc
import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mmserve_core.wire.errors import FailedPrecondition

_NP_TO_WIRE = {"bfloat16": mx.uint16, "float16": mx.float16, "float32": mx.float32}


@dataclass(frozen=True)
class Embedding:
    """Embedding rows as a numpy array holding the wire bytes of ``dtype``."""

    array: np.ndarray  # bfloat16 travels as uint16 bit patterns
    dtype: str


@dataclass(frozen=True)
class AudioFeatures:
    """One clip's log-mel frames, their validity mask, and the samples they came from."""

    features: np.ndarray  # [frames, mel bins] float32
    mask: np.ndarray  # [frames] bool, True = real audio
    waveform: np.ndarray  # kept for the rare re-encode (see ``Towers.encode_audio``)


def _to_wire(x: mx.array, dtype: str) -> Embedding:
    target = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[dtype]
    x = x.astype(target)
    if dtype == "bfloat16":
        x = x.view(mx.uint16)
    mx.eval(x)
    return Embedding(np.array(x, copy=True), dtype)


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image (or video frame) as its model takes it.

    Towers (E-series, 26B-A4B, 31B): ``pixels`` [1, 3, H, W], no positions.  Unified embedders:
    ``pixels`` [1, budget, 48·48·3] model patches padded to the budget and ``positions``
    [1, budget, 2] (-1 on padding).  Equal ``shape`` = one forward pass can take both."""

    pixels: np.ndarray
    positions: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)


class MediaModel(abc.ABC):
    """What every checkpoint's media half shares: loading only the named modules, their identity,
    dtype and processor settings.  Subclasses say which modules and how they encode."""

    MODULES: tuple[str, ...] = ()

    def __init__(self, checkpoint: Path) -> None:
        from mlx_vlm.utils import load_model, load_processor

        full = load_model(Path(checkpoint), lazy=True)
        self.config = full.config
        for name in self.MODULES:
            setattr(self, name, getattr(full, name, None))
        del full  # the language model's lazy arrays go unevaluated, never read from disk
        gc.collect()
        self.modules = {name: getattr(self, name) for name in self.MODULES if getattr(self, name) is not None}
        if not self.modules:
            raise FailedPrecondition("this checkpoint has neither a vision nor an audio path")
        mx.eval([m.parameters() for m in self.modules.values()])
        self.param_bytes = sum(v.nbytes for m in self.modules.values() for _, v in tree_flatten(m.parameters()))
        self.identity = _weights_identity(self.modules)
        proj = getattr(self, "embed_vision", None) or getattr(self, "embed_audio", None)
        w = proj.embedding_projection
        wdtype = w.scales.dtype if hasattr(w, "scales") else w.weight.dtype  # quantized: packed uint32
        self.dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}.get(wdtype, "float32")
        processor = load_processor(Path(checkpoint))
        self.image_processor = getattr(processor, "image_processor", None)
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.audio_ms_per_token = float(getattr(processor, "audio_ms_per_token", 40))
        self.audio_max_tokens = int(getattr(processor, "audio_seq_length", 750))
        self.sample_rate = int(getattr(self.feature_extractor, "sampling_rate", 16000))
        self.default_image_soft_tokens = int(getattr(self.image_processor, "max_soft_tokens", 280) or 280)
        self.video_processor = getattr(processor, "video_processor", None)
        self.video_max_frames = int(getattr(self.video_processor, "num_frames", 32) or 32)
        self.video_default_fps = float(getattr(self.video_processor, "default_fps", 2.0) or 2.0)
        self.video_frame_soft_tokens = int(getattr(self.video_processor, "max_soft_tokens", 70) or 70)

    @property
    def has_video(self) -> bool:
        """Frames go through the vision path: a video needs it and the checkpoint's video processor."""
        return self.has_vision and self.video_processor is not None

    def preprocess_video(self, frames: np.ndarray) -> tuple[list[ImageInput], int]:
        """Sampled RGB frames [T, H, W, 3] uint8 -> one model input per frame, and the soft tokens a
        frame has (all frames of a video share the size).  The checkpoint's own video processor:
        the same resize (at most ``video_frame_soft_tokens`` a frame), patches and positions as
        ``mlx_vlm`` gives it.  numpy only, any thread."""
        data = self.video_processor([np.transpose(frames, (0, 3, 1, 2))])
        pixels, positions = np.asarray(data["pixel_values_videos"]), np.asarray(data["video_position_ids"])
        pixels = pixels.reshape(-1, *pixels.shape[-2:]).astype(np.float32)
        positions = positions.reshape(-1, *positions.shape[-2:])
        n = int(data["num_soft_tokens_per_frame"][0])
        return [ImageInput(pixels[t : t + 1], positions[t : t + 1]) for t in range(pixels.shape[0])], n

    @property
    @abc.abstractmethod
    def has_vision(self) -> bool:
        """The vision path is loaded (a tower or the embedders) and the processor can feed it."""

    @property
    @abc.abstractmethod
    def has_audio(self) -> bool:
        """The audio path is loaded and the feature extractor can feed it."""

    @property
    def audio_block_samples(self) -> int:
        """Samples in one full audio block (Gemma 4: 750 tokens x 40 ms = 30 s)."""
        return int(round(self.audio_max_tokens * self.audio_ms_per_token / 1000.0 * self.sample_rate))

    @property
    def image_budgets(self) -> tuple[int, ...]:
        from mlx_vlm.models.gemma4.processing_gemma4 import _SUPPORTED_SOFT_TOKENS

        return tuple(sorted(set(_SUPPORTED_SOFT_TOKENS) | {self.default_image_soft_tokens}))

    def parameter_names(self) -> list[str]:
        """Dotted names of every parameter this process holds (for the towers-only check)."""
        return [f"{name}.{k}" for name, m in self.modules.items() for k, _ in tree_flatten(m.parameters())]


def load_media_model(checkpoint: Path) -> MediaModel:
    """The media half of ``checkpoint``: Gemma 4's towers, or the unified model's embedders."""
    import json

    import mlx_vlm.models.gemma4  # noqa: F401 - registers the Gemma 4 processor classes

    model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    if model_type == "gemma4_unified":
        import mlx_vlm.models.gemma4_unified  # noqa: F401 - registers the unified processor classes

        from encoder_service.unified_model import UnifiedEmbedders

        return UnifiedEmbedders(checkpoint)
    return Towers(checkpoint)


class Towers(MediaModel):
    """The multimodal half of a Gemma 4 checkpoint with towers (E2B/E4B, 26B-A4B, 31B)."""

    MODULES = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")

    @property
    def has_vision(self) -> bool:
        return self.vision_tower is not None and self.image_processor is not None

    @property
    def has_audio(self) -> bool:
        return self.audio_tower is not None and self.feature_extractor is not None

    # -- CPU preprocessing (any thread) -------------------------------------------
    def preprocess_image(self, image, soft_tokens: int | None = None) -> tuple[ImageInput, int]:
        """PIL RGB image -> (pixel_values [1,3,H,W], soft-token count).  numpy only."""
        kw = {"max_soft_tokens": soft_tokens} if soft_tokens else {}
        data, n_soft = self.image_processor([image], **kw)
        return ImageInput(np.asarray(data["pixel_values"])), int(n_soft[0])

    # -- tower passes (MLX thread) --------------------------------------------------
    def encode_images(self, images: list[ImageInput], rows: list[int], dtype: str) -> list[Embedding]:
        """One forward pass for same-shape images ([1,3,H,W] each) -> ``rows[i]`` rows each (equal
        shapes give equal counts)."""
        if not self.has_vision:
            raise FailedPrecondition("this checkpoint has no vision tower (vision_config is null)")
        n_soft = rows[0]
        pixel_values = [im.pixels for im in images]
        batch = mx.array(np.concatenate(pixel_values, axis=0))
        feats = self.embed_vision(self.vision_tower(batch))  # [1, B*n_soft, hidden]
        if feats.shape[1] != n_soft * len(pixel_values):
            raise RuntimeError(
                f"vision tower gave {feats.shape[1]} rows for {len(pixel_values)} images of {n_soft} tokens"
            )
        return [_to_wire(feats[0, i * n_soft : (i + 1) * n_soft], dtype) for i in range(len(pixel_values))]

    def encode_frames(self, frames: list[ImageInput], rows: list[int], dtype: str) -> list[Embedding]:
        """One vision-tower pass for video frames (patches + positions, padded alike) -> ``rows[i]``
        rows each: the tower drops each frame's padding and pools, as for mlx-vlm's video input."""
        if not self.has_vision:
            raise FailedPrecondition("this checkpoint has no vision tower (vision_config is null)")
        pixels = mx.array(np.concatenate([f.pixels for f in frames], axis=0))
        positions = mx.array(np.concatenate([f.positions for f in frames], axis=0))
        feats = self.embed_vision(self.vision_tower(pixels, positions))  # [1, sum(rows), hidden]
        if feats.shape[1] != sum(rows):
            raise RuntimeError(f"vision tower gave {feats.shape[1]} rows for {len(frames)} frames of {rows[0]}")
        starts = np.cumsum([0, *rows])
        return [_to_wire(feats[0, int(a) : int(b)], dtype) for a, b in zip(starts[:-1], starts[1:])]

    def audio_features(self, waveform: np.ndarray) -> AudioFeatures:
        """Mono float32 clip (≤ one block) -> log-mel features.  numpy only, any thread.

        Runs in the executor so the MLX thread only pads and runs the tower:
        feature extraction is ~40 % of a short clip's CPU time.  Clips shorter
        than one token are padded with silence to one token's length (the tower
        has no frame to give for less).
        """
        min_len = int(np.ceil(self.audio_ms_per_token / 1000.0 * self.sample_rate))
        if waveform.size < min_len:
            waveform = np.pad(waveform, (0, min_len - waveform.size))
        fe = self.feature_extractor([waveform], sampling_rate=self.sample_rate, return_attention_mask=True,
                                    max_length=self.audio_block_samples)
        return AudioFeatures(np.asarray(fe["input_features"][0], np.float32),
                             np.asarray(fe["input_features_mask"][0], bool), waveform)

    def encode_audio(self, clips: list[AudioFeatures], n_tokens: list[int], dtype: str) -> list[Embedding]:
        """Clips' features, batched with zero padding and masks -> exactly ``n_tokens[i]`` rows each.

        Rows are the first ``n_tokens`` encoder rows, as ``mlx_vlm`` scatters them
        (its placeholder count is ceil(ms / 40); the tower's stride rounding may
        mark the last, partly filled row as padding, but that is still the row
        the token gets).  For some lengths the tower's rounding yields one row
        *fewer* than ceil(ms / 40) (mlx-vlm then scatters too few rows); those
        clips are encoded again padded with silence to a whole number of
        tokens, which always yields enough rows.
        """
        if not self.has_audio:
            raise FailedPrecondition("this checkpoint has no audio tower (audio_config is null)")
        emb, n_rows = self._audio_pass(clips)
        short = [i for i, n in enumerate(n_tokens) if n_rows[i] < n]
        retry = {}
        if short:
            token_samples = self.audio_ms_per_token / 1000.0 * self.sample_rate
            padded = []
            for i in short:
                w = clips[i].waveform
                padded.append(self.audio_features(
                    np.pad(w, (0, max(0, int(np.ceil(n_tokens[i] * token_samples)) - w.size)))))
            emb2, rows2 = self._audio_pass(padded)
            retry = {i: (emb2[k], rows2[k]) for k, i in enumerate(short)}
        out = []
        for i, n in enumerate(n_tokens):
            e, rows = retry.get(i, (emb[i], n_rows[i]))
            if rows < n:
                raise RuntimeError(f"audio tower produced {rows} rows for a clip needing {n} tokens")
            out.append(_to_wire(e[:n], dtype))
        return out

    def _audio_pass(self, clips: list[AudioFeatures]) -> tuple[mx.array, list[int]]:
        """One batched tower pass -> (embeddings [B, T, hidden], usable rows per clip).

        Usable = valid rows, plus the one partly filled row after them if the
        tower produced it (see ``encode_audio``).  Padding frames are zeros and
        masked, exactly as the feature extractor pads a batch itself."""
        frames = max(c.features.shape[0] for c in clips)
        feats = np.zeros((len(clips), frames, clips[0].features.shape[1]), np.float32)
        valid = np.zeros((len(clips), frames), bool)
        for i, c in enumerate(clips):
            feats[i, : c.features.shape[0]] = c.features
            valid[i, : c.mask.shape[0]] = c.mask
        enc, pad_mask = self.audio_tower(mx.array(feats), mx.array(~valid))
        emb = self.embed_audio(enc)
        n_valid = (~pad_mask).sum(axis=1).tolist()
        return emb, [min(int(v) + 1, int(emb.shape[1])) for v in n_valid]


def _weights_identity(modules: dict) -> str:
    """A digest of the tower weights themselves (names, dtypes, shapes, bytes).

    Why content, not paths: encoders on different machines serving the same
    checkpoint must hand out the same media hashes, or the decoder's prefix
    cache would miss whenever a request lands on another encoder replica.
    Costs one pass over the tower bytes at start-up (towers are small).
    """
    h = hashlib.blake2b(digest_size=16)
    for name, m in sorted(modules.items()):
        for k, v in sorted(tree_flatten(m.parameters()), key=lambda kv: kv[0]):
            h.update(f"{name}.{k}|{v.dtype}|{v.shape}|".encode())
            if v.dtype == mx.bfloat16:
                v = v.view(mx.uint16)
            h.update(np.asarray(v).tobytes())
    return h.hexdigest()

"""Facts read from a checkpoint directory's JSON files (no MLX, no weights).

Why: the EOS set, multimodal token ids and context length must come from the
checkpoint, never be hard-coded — real Gemma 4 puts ``<|image|>`` at 258880,
the tiny test checkpoint at 252.  The EOS set is the union of the tokenizer's
EOS, ``config.json`` and ``generation_config.json`` (Gemma 4: 1, 106, 50);
any one alone misses a stop token.  Pure functions, any thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmserve_core.wire.types import MediaTokens


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    model_id: str
    model_type: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    image: MediaTokens | None
    audio: MediaTokens | None
    video: MediaTokens | None  # a frame: <|video|> placeholders between the image begin / end markers
    video_token_id: int | None
    context_length: int
    hidden_size: int
    vocab_size: int
    has_audio_path: bool   # an audio tower (E-series) or the unified model's audio embedder
    has_vision_path: bool  # a vision tower or the unified model's patch embedder
    encoder_free: bool     # the unified model: media go straight into small embedders, no towers
    bidirectional_vision: bool
    per_layer_inputs: bool
    config_eos: tuple[int, ...]
    generation_config_eos: tuple[int, ...]

    def eos_token_ids(self, tokenizer_eos_ids: list[int] | tuple[int, ...] = ()) -> list[int]:
        """The full stop set: tokenizer EOS ∪ config.json ∪ generation_config.json."""
        return sorted(set(tokenizer_eos_ids) | set(self.config_eos) | set(self.generation_config_eos))

    @property
    def placeholder_token_ids(self) -> dict[str, int]:
        """Every media placeholder id the checkpoint declares, served or not (video included):
        none may appear in a prompt outside a span that carries its rows."""
        ids = {name: m.placeholder for name, m in (("image", self.image), ("audio", self.audio)) if m is not None}
        if self.video_token_id is not None:
            ids["video"] = int(self.video_token_id)
        return ids

    @property
    def media_token_ids(self) -> list[int]:
        """Placeholder and boundary ids: never sampled, never emitted."""
        ids: set[int] = set()
        for m in (self.image, self.audio):
            if m is not None:
                ids |= {m.placeholder, m.begin, m.end}
        if self.video_token_id is not None:
            ids.add(self.video_token_id)
        return sorted(ids)


def read_checkpoint(path: str | Path, model_id: str | None = None) -> CheckpointInfo:
    path = Path(path)
    cfg = _read_json(path / "config.json")
    if not cfg:
        raise FileNotFoundError(f"{path}/config.json not found: not a checkpoint directory")
    gen = _read_json(path / "generation_config.json")
    text = cfg.get("text_config") or {}
    image = None
    if cfg.get("image_token_id") is not None:
        image = MediaTokens(
            int(cfg["image_token_id"]), int(cfg["boi_token_id"]), int(cfg["eoi_token_id"])
        )
    audio = None
    if cfg.get("audio_token_id") is not None:
        # the unified model's config names the audio end token eoa_token_index (mlx-vlm reads either)
        eoa = cfg.get("eoa_token_id", cfg.get("eoa_token_index"))
        if eoa is None:
            raise ValueError(f"{path}/config.json declares audio_token_id but neither eoa_token_id nor "
                             "eoa_token_index (the audio end token)")
        audio = MediaTokens(int(cfg["audio_token_id"]), int(cfg["boa_token_id"]), int(eoa))
    video = None
    if cfg.get("video_token_id") is not None and image is not None:
        video = MediaTokens(int(cfg["video_token_id"]), image.begin, image.end)
    config_eos = tuple(_as_list(cfg.get("eos_token_id")) + _as_list(text.get("eos_token_id")))
    return CheckpointInfo(
        path=path,
        model_id=model_id or path.name,
        model_type=str(cfg.get("model_type", "")),
        config=cfg,
        generation_config=gen,
        image=image,
        audio=audio,
        video=video,
        video_token_id=cfg.get("video_token_id"),
        context_length=int(text.get("max_position_embeddings", cfg.get("max_position_embeddings", 8192))),
        hidden_size=int(text.get("hidden_size", cfg.get("hidden_size", 0))),
        vocab_size=int(text.get("vocab_size", cfg.get("vocab_size", 0))),
        has_audio_path=cfg.get("audio_config") is not None,
        has_vision_path=cfg.get("vision_config") is not None,
        encoder_free=str(cfg.get("model_type", "")) == "gemma4_unified",
        bidirectional_vision=text.get("use_bidirectional_attention") == "vision",
        per_layer_inputs=bool(text.get("hidden_size_per_layer_input")),
        config_eos=config_eos,
        generation_config_eos=tuple(_as_list(gen.get("eos_token_id"))),
    )

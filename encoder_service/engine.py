"""Encoder engine: media decoding off-thread, tower work on the one MLX thread.

Why: decoding PNGs and resampling audio is CPU work that can run in parallel
in the default executor and fails fast on bad input; only the tower forward
passes need the MLX thread (``MLXWorker``), which owns ``Towers``.

Thread ownership: ``encode`` is awaited on the event loop; ``_decode_*`` run in
the default executor; ``_run_towers`` runs on the MLX thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from encoder_service import media
from encoder_service.config import EncoderConfig
from mmserve_common import types as T
from mmserve_common.checkpoint import CheckpointInfo, read_checkpoint
from mmserve_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from mmserve_common.logs import get_logger
from mmserve_common.mlx_thread import MLXWorker
from mmserve_common.tensors import RawTensor

log = get_logger(__name__)


@dataclass
class _Prepared:
    """A decoded, preprocessed item ready for the towers."""

    modality: str
    array: object  # pixel_values or waveform (numpy)
    soft_tokens: int
    content_hash: str


class EncoderEngine:
    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.info: CheckpointInfo = read_checkpoint(cfg.checkpoint, cfg.model_id)
        self.worker = MLXWorker("encoder-mlx", max_queue=cfg.max_queue)
        self.towers = None  # set on the MLX thread; read-only facts used elsewhere

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.worker.start(self._load_and_warm)

    async def wait_ready(self) -> None:
        await self.worker.wait_ready()

    def stop(self) -> None:
        self.worker.stop()

    def _load_and_warm(self):
        """MLX thread: load towers only, then run one tiny forward per tower."""
        import numpy as np
        from PIL import Image

        from encoder_service.model import Towers

        t0 = time.perf_counter()
        towers = Towers(Path(self.cfg.checkpoint))
        self.towers = towers
        pv, n = towers.preprocess_image(Image.new("RGB", (64, 64), (127, 127, 127)))
        towers.encode_image(pv, n, towers.dtype)
        if towers.has_audio:
            wav = np.zeros(towers.sample_rate // 10, dtype=np.float32)
            towers.encode_audio(wav, media.audio_soft_tokens(wav.size, towers.sample_rate,
                                                              towers.audio_ms_per_token), towers.dtype)
        log.info("encoder ready", checkpoint=self.cfg.checkpoint, audio=towers.has_audio,
                 tower_param_bytes=towers.param_bytes, load_s=round(time.perf_counter() - t0, 3))
        return towers

    # -- facts ------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        mods = [T.IMAGE]
        if self.towers is not None and self.towers.has_audio:
            mods.append(T.AUDIO)
        return mods

    # -- request path -----------------------------------------------------------
    async def encode(self, items: list[T.MediaInput], dtype: str | None) -> list[T.EncodedItem]:
        """Decode, validate and encode ``items``; results in request order."""
        if not items:
            raise InvalidArgument("items: at least one media item is required")
        if len(items) > self.cfg.max_items:
            raise InvalidArgument(f"items: {len(items)} media items, over the limit of {self.cfg.max_items}")
        towers = self.towers
        if towers is None:
            raise Unavailable("encoder is still loading")
        dtype = dtype or towers.dtype
        for i, it in enumerate(items):
            if it.modality == T.AUDIO and not towers.has_audio:
                raise FailedPrecondition(
                    f"items[{i}]: this checkpoint has no audio tower, so audio cannot be encoded"
                )
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(None, self._prepare, i, it) for i, it in enumerate(items))
        )
        return await self.worker.submit(_run_towers, prepared, dtype)

    def _prepare(self, index: int, item: T.MediaInput) -> _Prepared:
        """Executor thread: decode + preprocess one item (numpy only)."""
        towers = self.towers
        what = f"items[{index}]"
        h = hashlib.sha256()
        h.update(f"{self.info.model_id}|{item.modality}|".encode())
        if item.modality == T.IMAGE:
            img = media.decode_image(item.data, what=what, max_pixels=self.cfg.max_image_pixels)
            pixel_values, n = towers.preprocess_image(img)
            h.update(str(pixel_values.shape).encode())
            h.update(pixel_values.tobytes())
            return _Prepared(T.IMAGE, pixel_values, n, h.hexdigest())
        limit = min(self.cfg.max_audio_seconds,
                    towers.audio_max_tokens * towers.audio_ms_per_token / 1000.0)
        audio = media.decode_audio(item.data, what=what, target_rate=towers.sample_rate, max_seconds=limit)
        n = media.audio_soft_tokens(audio.waveform.size, towers.sample_rate, towers.audio_ms_per_token)
        if n > towers.audio_max_tokens:  # resampling rounding at the limit
            raise InvalidArgument(
                f"{what}: audio is {audio.duration_s:.2f} s long, over the limit of {limit:g} s"
            )
        h.update(audio.waveform.tobytes())
        return _Prepared(T.AUDIO, audio.waveform, n, h.hexdigest())


def _run_towers(towers, prepared: list[_Prepared], dtype: str) -> list[T.EncodedItem]:
    """MLX thread: run each item through its tower."""
    out = []
    for p in prepared:
        if p.modality == T.IMAGE:
            emb = towers.encode_image(p.array, p.soft_tokens, dtype)
        else:
            emb = towers.encode_audio(p.array, p.soft_tokens, dtype)
        out.append(
            T.EncodedItem(p.modality, p.content_hash,
                          RawTensor(emb.array.tobytes(), emb.dtype, tuple(emb.array.shape)))
        )
    return out

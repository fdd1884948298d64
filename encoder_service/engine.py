"""Encoder engine: decode off-thread, cache by content, batch tower work on the MLX thread.

Why: decoding and resampling are CPU work that runs in parallel in the
default executor and fails fast on bad input; only tower passes need the MLX
thread, where ``TowerBatcher`` groups them across items and requests.  A
request goes through:

1. checks that need no decoding (item count, missing tower, image budget);
2. the raw-bytes alias: a byte-identical resend of cached media is served
   without decoding;
3. decoding + validation of every other item, in parallel — any bad item
   fails the whole request *before* tower work starts;
4. the content key (hash of decoded media + preprocessing parameters +
   checkpoint weights, + output dtype): a hit costs no tower work, a key
   already being computed by another request is awaited, not recomputed;
5. tower tasks for the rest (an image, or one task per 30 s audio block),
   submitted all at once (all-or-nothing against the queue bound).

``encode`` returns one future per item, in request order, so the transport
streams item 0 while item 1 is still in the tower.

Thread ownership: ``encode`` on the event loop (which also owns the cache and
the in-flight table); ``_decode`` in the default executor; ``_run_group`` on
the MLX thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder_service import media
from encoder_service.batcher import TowerBatcher, TowerTask
from encoder_service.cache import EmbeddingCache
from encoder_service.config import EncoderConfig
from encoder_service.metrics import EncoderMetrics
from mmserve_core.runtime.checkpoint import CheckpointInfo, read_checkpoint
from mmserve_core.runtime.logs import get_logger
from mmserve_core.runtime.mlx_thread import MLXWorker
from mmserve_core.runtime.wired_memory import wire_weights
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import FailedPrecondition, InvalidArgument, Unavailable
from mmserve_core.wire.tensors import RawTensor

log = get_logger(__name__)

AUDIO_BUCKET_TOKENS = 125  # audio blocks batch with others of the same 5 s length bucket


@dataclass
class _Decoded:
    """One item after decoding: what the towers need and what identifies it."""

    modality: str
    content_hash: str
    blocks: list[tuple[str, object, int]]  # (kind, tower input, rows) per block: ImageInput or AudioFeatures
    raw_key: str
    frame_seconds: tuple[float, ...] = ()  # video: a stamp per frame block (the first blocks)


class EncoderEngine:
    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.info: CheckpointInfo = read_checkpoint(cfg.checkpoint, cfg.model_id)
        self.worker = MLXWorker("encoder-mlx", max_queue=cfg.max_queue)
        self.metrics = EncoderMetrics()
        self.cache = EmbeddingCache(cfg.cache_bytes)
        self.batcher = TowerBatcher(
            self.worker, _run_group, max_batch=cfg.max_batch, max_pending=cfg.max_pending,
            on_batch=lambda kind, n: self.metrics.batch_size.labels(kind).observe(n),
        )
        self.metrics.bind(lambda: self.batcher.depth, self.cache)
        self._inflight: dict[str, asyncio.Future] = {}
        self.towers = None  # set on the MLX thread; read-only facts used elsewhere
        self.identity = ""

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.worker.start(self._load_and_warm)

    async def wait_ready(self) -> None:
        await self.worker.wait_ready()

    def stop(self) -> None:
        self.worker.stop()

    def _load_and_warm(self):
        """MLX thread: load towers only, fingerprint them, run one tiny forward per tower."""
        from PIL import Image

        from encoder_service.model import load_media_model

        t0 = time.perf_counter()
        towers = load_media_model(Path(self.cfg.checkpoint))
        wire_weights(towers.param_bytes, "towers and projectors")
        proc = Path(self.cfg.checkpoint) / "processor_config.json"
        h = hashlib.blake2b(digest_size=16)
        h.update(towers.identity.encode())
        if proc.exists():
            h.update(json.dumps(json.loads(proc.read_text()), sort_keys=True).encode())
        self.identity = h.hexdigest()
        if towers.has_vision:
            pv, n = towers.preprocess_image(Image.new("RGB", (64, 64), (127, 127, 127)), min(towers.image_budgets))
            towers.encode_images([pv], [n], towers.dtype)
        if towers.has_video:
            frames, n = towers.preprocess_video(np.full((2, 64, 64, 3), 127, np.uint8))
            towers.encode_frames(frames, [n] * len(frames), towers.dtype)
        if towers.has_audio:
            wav = np.zeros(towers.sample_rate // 10, dtype=np.float32)
            towers.encode_audio([towers.audio_features(wav)], [media.audio_soft_tokens(
                wav.size, towers.sample_rate, towers.audio_ms_per_token)], towers.dtype)
        self.towers = towers
        log.info("encoder ready", checkpoint=self.cfg.checkpoint, model=type(towers).__name__,
                 vision=towers.has_vision, audio=towers.has_audio, video=towers.has_video,
                 tower_param_bytes=towers.param_bytes, identity=self.identity,
                 load_s=round(time.perf_counter() - t0, 3))
        return towers

    # -- facts ------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        t = self.towers
        if t is None:
            return []
        return [m for m, ok in ((T.IMAGE, t.has_vision), (T.AUDIO, t.has_audio), (T.VIDEO, t.has_video)) if ok]

    @property
    def audio_block_seconds(self) -> float:
        t = self.towers
        return t.audio_max_tokens * t.audio_ms_per_token / 1000.0 if t else 0.0

    # -- request path -----------------------------------------------------------
    async def encode(self, items: list[T.MediaInput], dtype: str | None) -> list[asyncio.Future]:
        """Validate and schedule ``items``; one future of ``T.EncodedItem`` per item, in order.

        Steps: check the request; answer byte-identical resends from the cache without
        decoding; decode the rest off the loop; answer decoded media the cache or another
        request already has; send what is left to the towers."""
        t0 = time.perf_counter()
        towers = self._check_request(items)
        dtype = dtype or towers.dtype
        loop = asyncio.get_running_loop()
        out: list[asyncio.Future | None] = [None] * len(items)
        raw_keys = [self._raw_key(it) for it in items]
        to_decode = self._from_raw_cache(raw_keys, dtype, out, t0)
        decoded = await asyncio.gather(
            *(loop.run_in_executor(None, self._decode, i, items[i], raw_keys[i]) for i in to_decode)
        )
        tasks, pending = self._tower_work(to_decode, decoded, dtype, out, t0)
        self._submit(tasks, pending)
        for i, d, key, futs in pending:
            asyncio.ensure_future(self._assemble(d, key, futs, out[i], t0))
        return out  # type: ignore[return-value]

    def _check_request(self, items: list[T.MediaInput]):
        if not items:
            raise InvalidArgument("items: at least one media item is required")
        if len(items) > self.cfg.max_items:
            raise InvalidArgument(f"items: {len(items)} media items, over the limit of {self.cfg.max_items}")
        towers = self.towers
        if towers is None:
            raise Unavailable("encoder is still loading")
        for i, it in enumerate(items):
            self._check_servable(i, it, towers)
        return towers

    def _from_raw_cache(self, raw_keys: list[str], dtype: str, out: list, t0: float) -> list[int]:
        """Fill ``out`` for items whose exact bytes were encoded before; the indexes still to decode."""
        loop = asyncio.get_running_loop()
        to_decode = []
        for i, rk in enumerate(raw_keys):
            key = self.cache.resolve_alias(rk + dtype) if self.cache.enabled else None
            hit = self.cache.get(key) if key else None
            if hit is not None:
                out[i] = self._done(loop, hit, True, t0)
            else:
                to_decode.append(i)
        return to_decode

    def _tower_work(self, to_decode: list[int], decoded: list, dtype: str, out: list, t0: float):
        """Decoded items the cache or an in-flight computation answers; tower tasks for the rest."""
        loop = asyncio.get_running_loop()
        tasks: list[TowerTask] = []
        pending: list[tuple[int, _Decoded, str, list[asyncio.Future]]] = []
        for i, d in zip(to_decode, decoded):
            key = f"{d.content_hash}|{dtype}"
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.put(key, hit, d.raw_key + dtype)
                out[i] = self._done(loop, hit, True, t0)
                continue
            if key in self._inflight:  # the same media is in the towers for another request/item
                out[i] = self._follow(self._inflight[key], t0)
                continue
            futs = []
            for kind, arr, rows in d.blocks:
                f = loop.create_future()
                group = (kind, -(-rows // AUDIO_BUCKET_TOKENS), dtype) if kind == T.AUDIO else (kind, arr.shape, dtype)
                tasks.append(TowerTask(kind, group, arr, rows, dtype, f))
                futs.append(f)
            item_fut = loop.create_future()
            self._inflight[key] = item_fut
            pending.append((i, d, key, futs))
            out[i] = item_fut
        return tasks, pending

    def _submit(self, tasks: list[TowerTask], pending: list) -> None:
        try:
            if tasks:
                self.batcher.submit(tasks)
        except BaseException as e:
            for _, _, key, _ in pending:
                fut = self._inflight.pop(key)
                fut.set_exception(e)
                fut.exception()  # retrieved: followers (if any) see it, no "never retrieved" noise
            raise

    def _check_servable(self, i: int, it: T.MediaInput, towers) -> None:
        if it.modality == T.VIDEO:
            self._check_video(i, it, towers)
        if it.modality == T.AUDIO and not towers.has_audio:
            raise FailedPrecondition(f"items[{i}]: this checkpoint has no audio tower, so audio cannot be encoded")
        if it.modality == T.IMAGE and not towers.has_vision:
            raise FailedPrecondition(f"items[{i}]: this checkpoint has no vision tower, so images cannot be encoded")
        if it.image_soft_tokens:
            if it.modality != T.IMAGE:
                raise InvalidArgument(f"items[{i}]: image_soft_tokens applies to images only")
            if it.image_soft_tokens not in towers.image_budgets:
                raise InvalidArgument(
                    f"items[{i}]: image_soft_tokens {it.image_soft_tokens} is not one of "
                    f"{list(towers.image_budgets)}"
                )

    def _check_video(self, i: int, it: T.MediaInput, towers) -> None:
        """What a video asks for that needs no decoding: a vision path, sampling within the processor's
        bounds, an audio path for its track (unless the track is off)."""
        if not towers.has_video:
            raise FailedPrecondition(f"items[{i}]: this checkpoint has no vision path, so video cannot be encoded")
        v = it.video or T.VideoOptions()
        if v.fps and not 0 < v.fps <= MAX_VIDEO_FPS:
            raise InvalidArgument(f"items[{i}].video.fps: {v.fps:g} is not in (0, {MAX_VIDEO_FPS:g}]")
        if v.max_frames and not 2 <= v.max_frames <= towers.video_max_frames:
            raise InvalidArgument(f"items[{i}].video.max_frames: {v.max_frames} is not in "
                                  f"[2, {towers.video_max_frames}] (the processor's cap)")
        if v.audio_track and not towers.has_audio:
            raise InvalidArgument(f"items[{i}].video.audio_track: this model has no audio path, so the video's "
                                  "own audio track cannot be encoded; set the track off to send the frames alone")

    def _raw_key(self, it: T.MediaInput) -> str:
        h = hashlib.sha256()
        h.update(f"raw|{self.identity}|{it.modality}|{it.image_soft_tokens}|{it.video}|".encode())
        h.update(it.data)
        return h.hexdigest()

    def _done(self, loop, item: T.EncodedItem, hit: bool, t0: float) -> asyncio.Future:
        f = loop.create_future()
        f.set_result(dataclasses.replace(item, cache_hit=hit))
        self._observe(item.modality, "cache" if hit else "tower", t0)
        if hit:
            self.metrics.cache_hits.inc()
        return f

    def _observe(self, modality: str, source: str, t0: float) -> None:
        self.metrics.items.labels(modality, source).inc()
        self.metrics.item_latency.labels(modality).observe(time.perf_counter() - t0)

    def _follow(self, fut: asyncio.Future, t0: float) -> asyncio.Future:
        async def follow():
            item = await asyncio.shield(fut)
            self._observe(item.modality, "shared", t0)
            return item

        return asyncio.ensure_future(follow())

    async def _assemble(self, d: _Decoded, key: str, futs: list[asyncio.Future], out: asyncio.Future,
                        t0: float) -> None:
        """Event loop: join an item's blocks, cache it, resolve its future."""
        try:
            parts = await asyncio.gather(*futs)
            self.metrics.cache_misses.inc()
            rows = tuple(int(p.array.shape[0]) for p in parts)
            data = parts[0].array.tobytes() if len(parts) == 1 else b"".join(p.array.tobytes() for p in parts)
            tensor = RawTensor(data, parts[0].dtype, (sum(rows), int(parts[0].array.shape[1])))
            item = T.EncodedItem(d.modality, d.content_hash, tensor, rows if len(rows) > 1 else (),
                                 frame_seconds=d.frame_seconds)
            self.cache.put(key, item, d.raw_key + parts[0].dtype)
            self._observe(d.modality, "tower", t0)
            if not out.done():
                out.set_result(item)
        except BaseException as e:  # noqa: BLE001 - travels to the RPC through the future
            if not out.done():
                out.set_exception(e)
        finally:
            self._inflight.pop(key, None)

    # -- executor threads -----------------------------------------------------------
    def _decode(self, index: int, item: T.MediaInput, raw_key: str) -> _Decoded:
        """Decode, validate, hash and preprocess one item (numpy / PIL / soxr only)."""
        towers = self.towers
        what = f"items[{index}]"
        h = hashlib.sha256()
        if item.modality == T.IMAGE:
            budget = item.image_soft_tokens or towers.default_image_soft_tokens
            img = media.decode_image(item.data, what=what, max_pixels=self.cfg.max_image_pixels)
            h.update(f"{self.identity}|image|{budget}|{img.size}|".encode())
            h.update(img.tobytes())
            try:
                pixel_values, n = towers.preprocess_image(img, budget)
            except ValueError as e:
                raise InvalidArgument(f"{what}: image of size {img.size} cannot be preprocessed ({e})") from None
            return _Decoded(T.IMAGE, h.hexdigest(), [(T.IMAGE, pixel_values, n)], raw_key)
        if item.modality == T.VIDEO:
            return self._decode_video(item, what, raw_key)
        audio = media.decode_audio(item.data, what=what, target_rate=towers.sample_rate,
                                   max_seconds=self.cfg.max_audio_seconds)
        h.update(f"{self.identity}|audio|{towers.sample_rate}|{towers.audio_block_samples}|".encode())
        h.update(audio.waveform.tobytes())
        return _Decoded(T.AUDIO, h.hexdigest(), self._audio_blocks(audio.waveform), raw_key)

    def _audio_blocks(self, wav: np.ndarray) -> list[tuple[str, object, int]]:
        towers = self.towers
        blocks = []
        for s, e in media.split_blocks(wav.size, towers.audio_block_samples):
            rows = media.audio_soft_tokens(e - s, towers.sample_rate, towers.audio_ms_per_token)
            blocks.append((T.AUDIO, towers.audio_features(wav[s:e]), rows))
        return blocks

    def _decode_video(self, item: T.MediaInput, what: str, raw_key: str) -> _Decoded:
        """Frames sampled as mlx-vlm samples them, one block each, then the audio track's blocks.
        The content key is the container's bytes and the sampling: decoding is the costly part."""
        from encoder_service.video import VideoLimits, VideoSampling, decode_video

        towers, cfg = self.towers, self.cfg
        v = item.video or T.VideoOptions()
        sampling = VideoSampling(fps=v.fps or towers.video_default_fps,
                                 max_frames=v.max_frames or towers.video_max_frames)
        limits = VideoLimits(cfg.max_video_seconds, cfg.max_video_pixels, cfg.max_video_decode_s,
                             cfg.max_video_bytes, cfg.max_video_source_frames)
        video = decode_video(item.data, what=what, sampling=sampling, limits=limits, target_rate=towers.sample_rate,
                             audio_track=v.audio_track, max_audio_seconds=cfg.max_audio_seconds)
        frames, n = towers.preprocess_video(video.frames)
        blocks: list[tuple[str, object, int]] = [(T.VIDEO, f, n) for f in frames]
        if video.audio is not None:
            blocks += self._audio_blocks(video.audio.waveform)
        h = hashlib.sha256()
        h.update(f"{self.identity}|video|{sampling}|{v.audio_track}|{towers.sample_rate}|".encode())
        h.update(item.data)
        return _Decoded(T.VIDEO, h.hexdigest(), blocks, raw_key, video.timestamps)


MAX_VIDEO_FPS = 30.0  # a request's sampling rate at most (frames are capped by max_frames anyway)


def _run_group(towers, kind: str, arrays: list, rows: list[int], dtype: str):
    """MLX thread: one forward pass for a group of same-key tower inputs."""
    if kind == T.IMAGE:
        return towers.encode_images(arrays, rows, dtype)
    if kind == T.VIDEO:
        return towers.encode_frames(arrays, rows, dtype)
    return towers.encode_audio(arrays, rows, dtype)

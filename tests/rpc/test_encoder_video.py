"""The encoder's video path over real gRPC, E-series (towers) and unified (embedders).

A video is its sampled frames, one block each with its stamp, then its own audio track's blocks;
the frames go through the vision path batched (one pass for a clip's frames); rows equal mlx-vlm's
own video features for the same frames; the cache keys on the bytes and the sampling.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import pytest_asyncio

from deploy.demo.media import shape_frames, video_bytes
from encoder_service.video import VideoLimits, VideoSampling, decode_video
from mmserve_core.wire.stubs import encoder_pb2, tensor_pb2
from tests.rpc.test_encoder import _batches, _encode, serving

pytestmark = pytest.mark.asyncio(loop_scope="session")
TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(40000) / 16000)).astype(np.float32)
CLIP = video_bytes(shape_frames("red", "circle", "left", frames=24), fps=8, audio=TONE)


def _video(data: bytes, **options) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_VIDEO, data=data,
                                 video=encoder_pb2.VideoOptions(**options) if options else None)


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["e2b", "unified"])
async def enc(request, ckpt_e2b, ckpt_unified):
    ckpt = ckpt_e2b if request.param == "e2b" else ckpt_unified
    async with serving(ckpt) as (engine, ch):
        yield engine, ch, ckpt


async def test_frames_then_the_track_with_stamps(enc):
    engine, ch, _ = enc
    (h, _), = await _encode(ch, _video(CLIP))
    v = decode_video(CLIP, what="x", sampling=VideoSampling(), limits=VideoLimits(600, 10**8, 60), target_rate=16000,
                     audio_track=True, max_audio_seconds=600)
    frames = len(h.frame_seconds)
    assert frames == 6 and list(h.frame_seconds) == list(v.timestamps)
    per_frame = list(h.block_soft_tokens[:frames])
    assert len(set(per_frame)) == 1 and 0 < per_frame[0] <= 70
    track = list(h.block_soft_tokens[frames:])
    assert sum(track) == math.ceil(v.audio.waveform.size / 16000 * 1000 / 40)
    assert h.modality == tensor_pb2.MODALITY_VIDEO and h.soft_token_count == sum(h.block_soft_tokens)


async def test_frames_are_one_pass_and_equal_mlx_vlm(enc):
    from mlx_vlm.utils import load_model

    engine, ch, ckpt = enc
    before = _batches(engine, "video")
    (h, data), = await _encode(ch, _video(CLIP, audio_track=encoder_pb2.AUDIO_TRACK_OFF, max_frames=4),
                               dtype=tensor_pb2.DTYPE_FLOAT32)
    assert _batches(engine, "video") - before == 1  # the clip's 4 frames in one forward pass
    assert list(h.frame_seconds) and len(h.block_soft_tokens) == len(h.frame_seconds) == 4
    v = decode_video(CLIP, what="x", sampling=VideoSampling(max_frames=4), limits=VideoLimits(600, 10**8, 60),
                     target_rate=16000, audio_track=False, max_audio_seconds=600)
    ref_model = load_model(ckpt)
    data_ = engine.towers.video_processor([np.transpose(v.frames, (0, 3, 1, 2))])
    pv, pos = mx.array(data_["pixel_values_videos"]), mx.array(data_["video_position_ids"])
    if ckpt.name.endswith("unified"):
        ref = ref_model.get_video_features(pv, pos)
    else:
        ref = ref_model.embed_vision(ref_model.vision_tower(pv.reshape(-1, *pv.shape[-2:]),
                                                            pos.reshape(-1, *pos.shape[-2:])))[0]
    ours = np.frombuffer(data, np.float32).reshape(h.soft_token_count, -1)
    assert np.array_equal(ours, np.array(ref.astype(mx.float32)))


async def test_a_cache_hit_keeps_the_stamps_and_options_are_part_of_the_key(enc):
    _, ch, _ = enc
    (a, _), = await _encode(ch, _video(CLIP, fps=1.0))
    (b, _), = await _encode(ch, _video(CLIP, fps=1.0))
    (c, _), = await _encode(ch, _video(CLIP, fps=1.0, audio_track=encoder_pb2.AUDIO_TRACK_OFF))
    assert b.cache_hit and list(b.frame_seconds) == list(a.frame_seconds) and b.content_hash == a.content_hash
    assert not c.cache_hit and c.content_hash != a.content_hash
    assert list(c.block_soft_tokens) == list(a.block_soft_tokens[: len(a.frame_seconds)])


async def test_encoder_info_declares_video(enc):
    engine, ch, _ = enc
    stub = __import__("mmserve_core.wire.stubs", fromlist=["encoder_pb2_grpc"]).encoder_pb2_grpc
    info = await stub.EncoderServiceStub(ch).GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest())
    assert tensor_pb2.MODALITY_VIDEO in info.modalities
    assert (info.max_video_frames, info.default_video_fps, info.video_frame_soft_tokens) == (32, 2.0, 70)
    assert info.max_video_seconds == engine.cfg.max_video_seconds

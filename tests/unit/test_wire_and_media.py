"""Tensor chunking, media decoding and request parsing (pure logic)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from decoder_service.detokenizer import IncrementalDetokenizer
from deploy.demo.media import shape_png, tone_wav
from encoder_service.media import audio_soft_tokens, decode_audio, decode_image
from gateway.errors import HTTPError
from gateway.fronts.openai_chat.parse import parse_chat_request
from mmserve_core.wire.errors import InvalidArgument
from mmserve_core.wire.tensors import Assembler, iter_views


def test_chunks_reassemble_exactly():
    arr = np.arange(3 * 1000, dtype=np.float32)
    data = arr.tobytes()
    a = Assembler("t", "float32", (3, 1000))
    chunks = list(iter_views(data, 5000))
    assert len(chunks) == 3 and all(len(c) <= 5000 for _, c in chunks)
    for off, c in chunks:
        a.add(off, c)
    assert np.array_equal(a.finish().to_numpy().reshape(-1), arr)
    assert [len(c) for _, c in iter_views(arr, 5000)] == [5000, 5000, 2000]  # any buffer, in bytes


def test_one_whole_chunk_is_kept_without_a_copy():
    data = np.arange(12, dtype=np.float32).tobytes()
    view = memoryview(data)
    a = Assembler("t", "float32", (3, 4))
    a.add(0, view)
    t = a.finish()
    assert t.data is view and t.to_numpy()[2, 3] == 11.0


def test_assembler_rejects_lies():
    a = Assembler("t", "bfloat16", (2, 4))
    with pytest.raises(InvalidArgument, match="offset"):
        a.add(4, b"\0" * 4)
    a.add(0, b"\0" * 16)
    with pytest.raises(InvalidArgument, match="exceed"):
        a.add(16, b"\0")
    b = Assembler("t", "bfloat16", (2, 4))
    b.add(0, b"\0" * 8)
    with pytest.raises(InvalidArgument, match="8 of 16"):
        b.finish()


def test_image_decoding():
    img = decode_image(shape_png(fmt="JPEG"), what="x", max_pixels=10**7)
    assert img.mode == "RGB"
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        decode_image(b"not an image", what="items[0]", max_pixels=10**7)
    with pytest.raises(InvalidArgument, match="truncated|decodable"):
        decode_image(shape_png()[:200], what="items[0]", max_pixels=10**7)
    with pytest.raises(InvalidArgument, match="over the limit"):
        decode_image(shape_png(size=(400, 400)), what="x", max_pixels=1000)


def test_audio_decoding_resamples_and_downmixes():
    a = decode_audio(tone_wav(1.0, 44100, channels=2), what="x", target_rate=16000, max_seconds=30)
    assert a.sample_rate == 16000 and a.source_rate == 44100
    assert abs(a.waveform.size - 16000) <= 1
    assert audio_soft_tokens(a.waveform.size, 16000, 40) == 25
    f = decode_audio(tone_wav(0.5, 22050, fmt="FLAC"), what="x", target_rate=16000, max_seconds=30)
    assert abs(f.waveform.size - 8000) <= 1


def test_audio_errors():
    with pytest.raises(InvalidArgument, match="empty"):
        decode_audio(b"", what="x", target_rate=16000, max_seconds=30)
    with pytest.raises(InvalidArgument, match="not decodable"):
        decode_audio(b"RIFF1234WAVEjunk", what="x", target_rate=16000, max_seconds=30)
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0,), np.float32), 16000, format="WAV")
    with pytest.raises(InvalidArgument, match="no samples"):
        decode_audio(buf.getvalue(), what="x", target_rate=16000, max_seconds=30)
    with pytest.raises(InvalidArgument, match=r"31.00 s long, over the limit of 30 s"):
        decode_audio(tone_wav(31.0, 8000), what="x", target_rate=16000, max_seconds=30)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "AAAA", "format": "aac"}}]}]},
     "messages[0].content[0].input_audio.format"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content[0]"),
])
def test_request_errors_name_the_field(body, param):
    with pytest.raises(HTTPError) as ei:
        parse_chat_request(body)
    assert ei.value.status == 400 and ei.value.param == param


def test_audio_format_checked_against_bytes():
    import base64

    flac = base64.b64encode(tone_wav(0.2, 16000, fmt="FLAC")).decode()
    with pytest.raises(HTTPError, match="format is 'wav' but the data is flac"):
        parse_chat_request({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": flac, "format": "wav"}}]}]})


def test_incremental_detokenizer_matches_full_decode(ckpt_e2b):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt_e2b)
    text = "héllo wörld — 你好 ✓"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    out = "".join(d.add(t) for t in ids) + d.flush()
    assert out == text

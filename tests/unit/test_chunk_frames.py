"""``chunk_frames`` against protobuf: the hand-framed chunk is the message protobuf writes, and
anything that is not exactly a chunk is left to protobuf."""

from __future__ import annotations

import random

import pytest

from mmserve_core.wire.chunk_frames import read_chunk, write_chunk
from mmserve_core.wire.stubs import decoder_pb2, encoder_pb2

CASES = [(0, 0, b""), (0, 0, b"x"), (3, 0, b"abc"), (0, 1 << 20, b"\0" * 7), ((1 << 32) - 1, (1 << 64) - 1, b"z"),
         (127, 128, bytes(range(256)) * 9), (1, 2, b"\x12\x08\x01" * 1000)]


@pytest.mark.parametrize("index,offset,data", CASES)
def test_written_frames_are_protobufs_own_bytes(index, offset, data):
    enc = encoder_pb2.EncodeResponse(chunk=encoder_pb2.EmbeddingChunk(item_index=index, byte_offset=offset, data=data))
    dec = decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(span_index=index, byte_offset=offset, data=data))
    framed = write_chunk(index, offset, memoryview(data))
    assert framed == enc.SerializeToString() == dec.SerializeToString()
    back = encoder_pb2.EncodeResponse.FromString(framed)
    assert back.WhichOneof("payload") == "chunk"
    assert (back.chunk.item_index, back.chunk.byte_offset, back.chunk.data) == (index, offset, data)


@pytest.mark.parametrize("index,offset,data", CASES)
def test_read_frames_match_protobufs_parse(index, offset, data):
    raw = decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(
        span_index=index, byte_offset=offset, data=data)).SerializeToString()
    frame = read_chunk(raw)
    assert frame is not None and (frame.index, frame.byte_offset, bytes(frame.data)) == (index, offset, data)
    assert isinstance(frame.data, memoryview) and (not data or frame.data.obj is raw)  # a view, not a copy


def _field(number: int, wire: int, payload: bytes) -> bytes:
    from mmserve_core.wire.chunk_frames import _varint

    return _varint(number << 3 | wire) + payload


def test_anything_else_is_left_to_protobuf():
    from mmserve_core.wire.chunk_frames import _varint

    good = write_chunk(1, 5, b"abc")
    header = encoder_pb2.EncodeResponse(header=encoder_pb2.EmbeddingHeader(item_index=1)).SerializeToString()
    setup = decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(prompt_token_ids=[1, 2])).SerializeToString()
    inner_unknown = _field(9, 0, _varint(1))  # a field number the chunk does not have
    with_unknown = b"\x12" + _varint(len(inner_unknown) + 3) + inner_unknown + b"\x08\x01\x18" + b"\x00"
    twice = good + good  # protobuf merges a repeated submessage; we do not guess
    dup_inner = b"\x12\x04\x08\x01\x08\x02"
    wrong_wire = b"\x12\x02\x09\x01"  # field 1 as a fixed64
    for raw in (b"", header, setup, with_unknown, twice, dup_inner, wrong_wire, good[:-1], good + b"\x08\x01",
                b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x12\x05\x08\x80\x80\x80\x80\x10"):
        assert read_chunk(raw) is None, raw


def test_random_chunks_round_trip_both_ways():
    rng = random.Random(7)
    for _ in range(300):
        index, offset = rng.choice([0, rng.randrange(1 << 32)]), rng.choice([0, rng.randrange(1 << 64)])
        data = rng.randbytes(rng.choice([0, 1, 127, 128, 300, 70000]))
        framed = write_chunk(index, offset, data)
        msg = decoder_pb2.GenerateRequest(chunk=decoder_pb2.EmbeddingChunk(span_index=index, byte_offset=offset,
                                                                          data=data))
        assert framed == msg.SerializeToString()
        f = read_chunk(framed)
        assert (f.index, f.byte_offset, bytes(f.data)) == (index, offset, data)

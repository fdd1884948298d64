"""Embedding chunks on the wire without copies: the one hot message shape, framed by hand.

Why: protobuf's Python runtime copies a ``bytes`` field at every step — slicing
the tensor, building the message, serializing it, parsing it, reading the field
— so the embeddings' way from encoder to gateway to decoder cost about ten
copies of every byte, and loopback throughput stalled near 160 MB/s.  The
chunk messages of both services have one shape, ``{2: {1: index, 2:
byte_offset, 3: data}}`` (``EncodeResponse.chunk`` and ``GenerateRequest.chunk``),
so here they are written as a few header bytes joined to a view of the tensor
(one copy) and read as a ``memoryview`` into the received buffer (none).

Everything else — headers, setups, and any buffer that is not exactly this
shape (a repeated or unknown field, another wire type, an index past uint32) —
goes through protobuf: ``read_chunk`` returns None and the caller parses the
bytes with the generated class, so malformed input still gets protobuf's answer
and our unknown-field checks.  ``tests/unit/test_chunk_frames.py`` checks both
directions against protobuf.

Pure functions, no protobuf import: the codec and transport modules call them.
"""

from __future__ import annotations

from typing import NamedTuple

_OUTER_TAG = b"\x12"  # field 2 (chunk), length-delimited
_INDEX, _OFFSET, _DATA = 0x08, 0x10, 0x1A  # fields 1, 2 (varints) and 3 (bytes) of the chunk
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1


class ChunkFrame(NamedTuple):
    """One chunk read without copying: ``data`` is a view into the received message."""

    index: int
    byte_offset: int
    data: memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_chunk(index: int, byte_offset: int, data) -> bytes:
    """The serialized chunk message (as protobuf writes it: zero fields left out)."""
    n = len(data)
    inner = b"".join((
        (bytes((_INDEX,)) + _varint(index)) if index else b"",
        (bytes((_OFFSET,)) + _varint(byte_offset)) if byte_offset else b"",
        (bytes((_DATA,)) + _varint(n)) if n else b"",
    ))
    return b"".join((_OUTER_TAG, _varint(len(inner) + n), inner, data))


def _read_varint(buf, pos: int, end: int) -> tuple[int, int] | None:
    shift = result = 0
    while pos < end and shift < 70:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    return None


def read_chunk(buf: bytes) -> ChunkFrame | None:
    """``buf`` as a chunk frame, or None when it is anything else (parse it with protobuf)."""
    end = len(buf)
    if end < 2 or buf[0] != 0x12:
        return None
    got = _read_varint(buf, 1, end)
    if got is None or got[1] + got[0] != end:  # exactly one field at the top level
        return None
    pos = got[1]
    index = offset = 0
    data = memoryview(b"")
    seen = set()
    while pos < end:
        got = _read_varint(buf, pos, end)
        if got is None:
            return None
        tag, pos = got
        if tag in seen or tag not in (_INDEX, _OFFSET, _DATA):
            return None
        seen.add(tag)
        got = _read_varint(buf, pos, end)
        if got is None:
            return None
        value, pos = got
        if tag == _DATA:
            if pos + value > end:
                return None
            data = memoryview(buf)[pos:pos + value]
            pos += value
        elif tag == _INDEX:
            if value > _U32:
                return None
            index = value
        else:
            if value > _U64:
                return None
            offset = value
    return ChunkFrame(index, offset, data)

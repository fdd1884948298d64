"""Raw tensor bytes on the wire: dtypes, chunking and reassembly (numpy only).

Why: embeddings cross two gRPC hops as ``bytes + dtype + shape``.  bfloat16 has
no numpy dtype, so it travels (and is held here) as its raw 16-bit pattern in a
``uint16`` array; MLX code views it back as bfloat16.  Large tensors are sliced
into chunks well under gRPC's 4 MiB default message limit.  Pure functions, any
thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmserve_core.wire.errors import InvalidArgument

# dtype name -> numpy dtype used to hold the raw bytes
NUMPY_HOLDER = {
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
ITEMSIZE = {name: dt.itemsize for name, dt in NUMPY_HOLDER.items()}
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: far below gRPC's 4 MiB default


@dataclass(frozen=True)
class RawTensor:
    """A tensor as raw little-endian bytes plus its dtype name and shape."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_numpy(self) -> np.ndarray:
        """View as numpy (bfloat16 as uint16 bit patterns)."""
        return np.frombuffer(self.data, dtype=NUMPY_HOLDER[self.dtype]).reshape(self.shape)


def split_rows(t: RawTensor, rows: tuple[int, ...]) -> list[RawTensor]:
    """Split a ``[N, ...]`` tensor into consecutive row blocks (no copy when one block)."""
    if len(rows) == 1:
        return [t]
    row_bytes = len(t.data) // t.shape[0]
    out, off = [], 0
    for r in rows:
        out.append(RawTensor(t.data[off : off + r * row_bytes], t.dtype, (r, *t.shape[1:])))
        off += r * row_bytes
    if off != len(t.data):
        raise ValueError(f"row blocks {list(rows)} do not cover the tensor's {t.shape[0]} rows")
    return out


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    if dtype not in ITEMSIZE:
        raise InvalidArgument(f"unsupported tensor dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    return int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]


def iter_chunks(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte_offset, slice)`` pieces of ``data``; an empty tensor yields nothing."""
    chunk_bytes = max(1, int(chunk_bytes))
    view = memoryview(data)
    for off in range(0, len(data), chunk_bytes):
        yield off, bytes(view[off : off + chunk_bytes])


class Assembler:
    """Collects in-order chunks of one tensor and checks they add up exactly."""

    def __init__(self, what: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.what = what
        self.dtype = dtype
        self.shape = shape
        self.total = expected_nbytes(dtype, shape)
        self._buf = bytearray()

    def add(self, byte_offset: int, data: bytes) -> None:
        if byte_offset != len(self._buf):
            raise InvalidArgument(
                f"{self.what}: chunk at byte offset {byte_offset}, expected {len(self._buf)}"
            )
        if len(self._buf) + len(data) > self.total:
            raise InvalidArgument(
                f"{self.what}: chunks exceed the declared {self.total} bytes "
                f"(dtype {self.dtype}, shape {list(self.shape)})"
            )
        self._buf += data

    @property
    def received(self) -> int:
        return len(self._buf)

    @property
    def complete(self) -> bool:
        return len(self._buf) == self.total

    def finish(self) -> RawTensor:
        if not self.complete:
            raise InvalidArgument(
                f"{self.what}: received {len(self._buf)} of {self.total} declared bytes"
            )
        return RawTensor(bytes(self._buf), self.dtype, self.shape)

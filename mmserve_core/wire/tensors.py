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
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: far below gRPC's 4 MiB default (grpcurl, other clients)
# Between our own services (64 MiB message limit on every channel and server): one chunk holds
# any Gemma 4 item (1,120 soft tokens x 5,376 x bf16 = 12 MB), so it is received without a copy.
MAX_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class RawTensor:
    """A tensor as raw little-endian bytes plus its dtype name and shape."""

    data: bytes | bytearray | memoryview  # bytes-like: a received tensor stays on its receive buffer
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
        out.append(RawTensor(bytes(memoryview(t.data)[off : off + r * row_bytes]), t.dtype, (r, *t.shape[1:])))
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


def iter_views(data, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(byte_offset, view)`` pieces of ``data`` without copying; an empty tensor yields nothing."""
    chunk_bytes = max(1, int(chunk_bytes))
    view = memoryview(data).cast("B")
    for off in range(0, len(view), chunk_bytes):
        yield off, view[off : off + chunk_bytes]


class Assembler:
    """Collects in-order chunks of one tensor and checks they add up exactly."""

    def __init__(self, what: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.what = what
        self.dtype = dtype
        self.shape = shape
        self.total = expected_nbytes(dtype, shape)
        self._buf = None  # the one whole chunk, or a bytearray allocated at the first of several
        self._n = 0

    def add(self, byte_offset: int, data) -> None:
        """Take one chunk (bytes or a view into a received message): kept as it is when it is the
        whole tensor, else copied into place — the only copy."""
        if byte_offset != self._n:
            raise InvalidArgument(
                f"{self.what}: chunk at byte offset {byte_offset}, expected {self._n}"
            )
        n = len(data)
        if self._n + n > self.total:
            raise InvalidArgument(
                f"{self.what}: chunks exceed the declared {self.total} bytes "
                f"(dtype {self.dtype}, shape {list(self.shape)})"
            )
        if self._n == 0 and n == self.total:  # the whole tensor in one chunk: keep it, copy nothing
            self._buf = data
            self._n = n
            return
        if self._buf is None:
            self._buf = bytearray(self.total)
        self._buf[self._n : self._n + n] = data
        self._n += n

    @property
    def received(self) -> int:
        return self._n

    @property
    def complete(self) -> bool:
        return self._n == self.total

    def finish(self) -> RawTensor:
        """The tensor, on the received chunk or the assembled buffer itself (no final copy)."""
        if not self.complete:
            raise InvalidArgument(
                f"{self.what}: received {self._n} of {self.total} declared bytes"
            )
        buf, self._buf = self._buf if self._buf is not None else b"", None
        return RawTensor(buf, self.dtype, self.shape)

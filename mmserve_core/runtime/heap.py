"""Handing freed heap memory back to the operating system (glibc ``malloc_trim``).

Why: a burst of embedding streams allocates hundreds of MB in transient
buffers (gRPC's slices, the request bytes, the parsed chunks, the
reassembled rows).  glibc keeps what they free on its free lists, so after
200 stalled streams were timed out the decoder's RSS stayed at its peak.
``malloc_trim(0)`` returns those pages; it is what Dask and Ray call for
the same reason.  Where there is no glibc (macOS: its allocator returns
large blocks by itself) this is a no-op.  Thread-safe; it takes the
allocator's locks, so call it off the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return freed heap pages to the OS; ``False`` where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

"""The decoder's stream limits as pure logic: open streams, reserved bytes, release on every exit."""

from __future__ import annotations

import asyncio

import pytest

from decoder_service.intake import StreamAdmission, StreamLimits
from mmserve_core.wire.errors import ResourceExhausted


def test_open_streams_cap_and_release():
    adm = StreamAdmission(StreamLimits(max_open=2, max_buffered_bytes=100, idle_timeout_s=1))
    with adm.open(), adm.open():
        assert adm.open_streams == 2
        with pytest.raises(ResourceExhausted, match="--max-open-streams"), adm.open():
            pass
        assert adm.open_streams == 2
    assert adm.open_streams == 0


def test_reserved_bytes_cap_counts_across_streams_and_frees_on_error():
    async def run():
        adm = StreamAdmission(StreamLimits(max_open=10, max_buffered_bytes=100, idle_timeout_s=1))
        with adm.open() as a:
            adm.reserve(a, 60)
            with pytest.raises(RuntimeError), adm.open() as b:
                adm.reserve(b, 40)
                assert adm.reserved_bytes == 100
                raise RuntimeError("the stream failed")
            assert adm.reserved_bytes == 60
            with adm.open() as c:
                with pytest.raises(ResourceExhausted, match="--max-buffered-bytes"):
                    adm.reserve(c, 41)
                assert adm.reserved_bytes == 60 and c.reserved == 0
            adm.release(a)  # handed to the engine: no longer the stream's
            assert adm.reserved_bytes == 0
        assert adm.reserved_bytes == 0 and adm.open_streams == 0

    asyncio.run(run())

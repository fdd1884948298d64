"""TokenChannel: tokens from another thread arrive complete, in order, merged when the reader lags."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from decoder_service.channel import TokenChannel
from mmserve_core.wire import types as T

pytestmark = pytest.mark.asyncio


def _completion() -> T.Completion:
    return T.Completion("stop", 3, 2, 0, 0.0, 0.0, 0.0)


async def test_backlog_is_merged_into_one_event():
    ch = TokenChannel(asyncio.get_running_loop())
    t = threading.Thread(target=lambda: [ch.put(T.TokenEvent([i], f"t{i}")) for i in range(5)])
    t.start()
    t.join()
    batch = await ch.get_batch()
    assert batch == [T.TokenEvent([0, 1, 2, 3, 4], "t0t1t2t3t4")]


async def test_order_and_completion_survive_merging():
    ch = TokenChannel(asyncio.get_running_loop())
    done = _completion()

    def produce():
        for i in range(200):
            ch.put(T.TokenEvent([i], str(i % 10)))
            if i % 37 == 0:
                time.sleep(0.001)
        ch.put(done)

    threading.Thread(target=produce).start()
    ids, text, last = [], "", None
    while last is not done:
        for ev in await asyncio.wait_for(ch.get_batch(), 5):
            if isinstance(ev, T.TokenEvent):
                ids += ev.token_ids
                text += ev.text
            else:
                last = ev
    assert ids == list(range(200))
    assert text == "".join(str(i % 10) for i in range(200))


async def test_interval_holds_tokens_but_never_the_completion():
    loop = asyncio.get_running_loop()
    ch = TokenChannel(loop, min_interval_s=0.2)
    ch.put(T.TokenEvent([1], "a"))
    assert await asyncio.wait_for(ch.get_batch(), 1) == [T.TokenEvent([1], "a")]  # first: at once
    ch.put(T.TokenEvent([2], "b"))
    t0 = time.monotonic()
    assert await asyncio.wait_for(ch.get_batch(), 1) == [T.TokenEvent([2], "b")]
    assert time.monotonic() - t0 >= 0.15  # held until the interval since the last flush passed
    ch.put(T.TokenEvent([3], "c"))
    done = _completion()
    ch.put(done)
    t0 = time.monotonic()
    assert await asyncio.wait_for(ch.get_batch(), 1) == [T.TokenEvent([3], "c"), done]
    assert time.monotonic() - t0 < 0.15  # the completion flushes the held token with it


async def test_wake_returns_empty_batch():
    ch = TokenChannel(asyncio.get_running_loop())
    asyncio.get_running_loop().call_later(0.01, ch.wake)
    assert await asyncio.wait_for(ch.get_batch(), 1) == []

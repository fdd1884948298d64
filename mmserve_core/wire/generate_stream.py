"""Writing a decoder ``Generate`` request stream from asyncio so its status always comes through.

Why: grpc.aio reports a client-stream write that fails because the server
already ended the call as ``INTERNAL: Internal error from Core``, replacing
the status the server sent (grpc/grpc#36066) — a prompt over the context
length came back to users as a 500 in some tries.  The decoder sends its
initial metadata only once it has accepted the setup, so this writer sends
the setup, waits for those headers (or the end of the call), and only then
sends the embedding chunks: a refused setup ends the call while nothing is
in flight, and reading the call gives the decoder's own code and message.
After acceptance the decoder answers a bad chunk only after the client has
sent what it declared, so no write races a status then either.

Used by the gateway and the asyncio Python client.  Event-loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

_WRITE_ENDED = (grpc.aio.AioRpcError, grpc.aio.BaseError, asyncio.InvalidStateError)
# A decoder from before setup-accepted headers sends them only with its first token, i.e. after the
# chunks: past this wait (generous: a setup is checked in well under a millisecond, a large grammar
# in tens) the chunks are sent anyway, so a mixed-version rollout is slower to refuse, never stuck.
HEADERS_WAIT_S = 5.0


async def write_generate(call: grpc.aio.StreamStreamCall, setup, chunks: Iterable) -> None:
    """Send ``setup``, then (once accepted) every message of ``chunks``, then close our side.

    Returns when the stream is written or the call has ended; the outcome is
    what reading ``call`` gives — never a write error in place of the status.
    """
    try:
        await call.write(setup)
        it = iter(chunks)
        first = next(it, None)
        if first is not None:
            try:  # the decoder's "setup accepted" (or the end of the call)
                await asyncio.wait_for(asyncio.shield(call.initial_metadata()), HEADERS_WAIT_S)
            except asyncio.TimeoutError:
                pass
            if call.done():
                return
            await call.write(first)
            for msg in it:
                await call.write(msg)
        if not call.done():
            await call.done_writing()
    except _WRITE_ENDED:
        return  # the call ended under us: its status is what the caller reads next

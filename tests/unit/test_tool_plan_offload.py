"""The tool-call grammar is built on a worker thread, never on the gateway's event loop.

Why: building it walks the request's JSON Schemas — under a millisecond for most, over 100 ms for the
largest real-world ones — and every other stream's next token waits behind whatever holds the loop.
"""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

import gateway.pipeline as P
from gateway.request import ChatRequest
from mmserve_core.wire import types as T


class _Stop(Exception):
    pass


@pytest.mark.parametrize("with_tools", [True, False])
def test_the_tool_plan_runs_off_the_event_loop_when_there_are_tools(monkeypatch, with_tools):
    seen: dict[str, int] = {}

    def plan(req, mk):
        seen["plan"] = threading.get_ident()
        return P.ToolPlan(parse=bool(req.tools), close_id=None)

    async def prepare(req, rid):
        raise _Stop  # the plan is made before anything else; nothing past it is needed here

    monkeypatch.setattr(P, "plan_tools", plan)
    pipeline = types.SimpleNamespace(tool_markers=None, prepare=prepare)
    tools = [T.Tool("f", "", {"type": "object"})] if with_tools else []
    req = ChatRequest(model=None, messages=[], tools=tools, tool_choice="required" if with_tools else "none")

    async def main() -> None:
        seen["loop"] = threading.get_ident()
        with pytest.raises(_Stop):
            await P.Pipeline.start(pipeline, req, "rid")

    asyncio.run(main())
    # with tools: a worker thread; without, nothing to build, so no hop (the plan is a no-op)
    assert (seen["plan"] != seen["loop"]) is with_tools

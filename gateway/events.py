"""The typed event stream every front formats: ``Delta``s, then one ``Done``.

Why apart from the request: the pipeline produces these and every front (and
``gateway.reply``'s fold) consumes them; none of them sees a decoder protobuf
message.  Pure data, event-loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmserve_core.wire import types as T

ToolCallDelta = T.ToolCallDelta


@dataclass(frozen=True)
class Delta:
    """Tokens generated since the last event: answer text, thought-channel text, tool-call pieces,
    ids, logprobs."""

    content: str
    reasoning: str
    token_ids: list[int]
    logprobs: list[T.TokenLogprob]
    tool_calls: tuple[ToolCallDelta, ...] = ()


def delta_pieces(ev: Delta, keep_reasoning: bool) -> list[tuple[str, Any]]:
    """A delta's content as the fronts that split it into blocks / items need it, in the order it
    was written: ``("reasoning", text)`` (when kept), ``("text", text)``, then one ``("tool", piece)``
    per tool-call piece."""
    out: list[tuple[str, Any]] = []
    if ev.reasoning and keep_reasoning:
        out.append(("reasoning", ev.reasoning))
    if ev.content:
        out.append(("text", ev.content))
    return out + [("tool", d) for d in ev.tool_calls]


@dataclass(frozen=True)
class Done:
    """The end: finish reason, usage and timings (``completion``), encode time, the prompt ids,
    the complete tool calls.  ``finish_reason`` is the response's (``tool_calls`` when the model
    called tools), ``completion.finish_reason`` the decoder's."""

    completion: T.Completion
    encode_ms: float
    prompt_ids: list[int]
    tool_calls: tuple[T.ToolCall, ...] = ()
    finish_reason: str = ""

"""What a request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` ask of the decoder.

Why: each of them must have its effect, or be refused — none may be a hint in the prompt only:

* ``none`` — tools are still declared (the model may talk about them), and the call-open token
  is banned, so no call can start;
* ``auto`` — the model decides; its calls are parsed from the stream.  With a ``strict`` tool,
  or with a JSON ``response_format`` beside the tools, the whole response is a grammar
  (answer or calls), so strict arguments always validate;
* ``required`` / a named function — the response is one call (or several) under the grammar
  of ``tools.grammar``, so it always parses and validates; a JSON ``response_format`` beside it
  binds the answer after the tool results (the next request), as OpenAI reads it;
* ``parallel_tool_calls: false`` — a grammar allows one call; unconstrained, the decoder stops
  on the call's close token, so a second call never starts.

Pure Python; ``plan_tools`` runs on a worker thread (``Pipeline.start``: it builds the grammar).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.request import ChatRequest, bad
from gateway.tools.grammar import Markers, tool_call_grammar
from gateway.tools.parser import CLOSE, OPEN, QUOTE
from mmserve_core.wire import types as T

BAN = -1.0e9  # a logit bias no token survives (exp underflows to exactly 0)


@dataclass(frozen=True)
class ToolPlan:
    parse: bool  # the response may hold calls: run the tool-call parser over it
    close_id: int | None  # the decoder stops on this token (a call's close) when set


def markers(tokenizer) -> Markers | None:
    """The tool-call token ids of this checkpoint, or None if it has no such tokens."""
    ids = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, tok in (("call_open", OPEN), ("call_close", CLOSE), ("quote", QUOTE),
                      ("channel_open", "<|channel>"), ("channel_close", "<channel|>")):
        i = tokenizer.convert_tokens_to_ids(tok)
        ids[name] = None if i is None or i == unk else int(i)
    if None in (ids["call_open"], ids["call_close"], ids["quote"]):
        return None
    return Markers(**ids)


def plan_tools(req: ChatRequest, mk: Markers | None) -> ToolPlan:
    """Set ``req.sampling`` for the request's tool fields; what the response needs parsed."""
    if not req.tools:
        return ToolPlan(parse=False, close_id=None)
    if mk is None:
        raise bad("tools: this model has no tool-call tokens, so it cannot call tools", "tools")
    s = req.sampling
    if req.tool_choice == "none":
        s.logit_bias = {**s.logit_bias, mk.call_open: BAN}
        return ToolPlan(parse=False, close_id=None)
    answer = s.constraint
    forced = req.tool_choice in ("required", "function")
    if answer is not None and answer.kind not in ("json_schema", "json_object"):
        raise bad(f"{req.constraint_param}: a regex or grammar constraint cannot be combined with tools",
                  req.constraint_param)
    if forced:
        # this reply is the call (OpenAI's reading too): the format binds the text answer a later
        # request makes after the tool results, where the client sends it again
        answer = None
    if forced or req.strict_tools or answer is not None:
        thinking = bool(req.chat_template_kwargs.get("enable_thinking"))
        grammar = tool_call_grammar(req.tools, mk, choice=req.tool_choice, name=req.tool_name,
                                    parallel=req.parallel_tool_calls, thinking=thinking, answer=answer,
                                    schema_path=req.tool_schema_path)
        s.constraint = T.Constraint("lark", grammar)
        req.constraint_param = "tool_choice" if forced else "tools"
        return ToolPlan(parse=True, close_id=None)
    if not req.parallel_tool_calls:
        s.stop_token_ids = [*s.stop_token_ids, mk.call_close]
        return ToolPlan(parse=True, close_id=mk.call_close)
    return ToolPlan(parse=True, close_id=None)


def finish_reason(decoder_reason: str, calls: int) -> str:
    """OpenAI's: ``tool_calls`` when the model called tools and stopped by itself."""
    return "tool_calls" if calls and decoder_reason == "stop" else decoder_reason


"""Tools, tool calls and tool results as the checkpoint's chat template expects them.

Why: the gateway never formats tools by hand — the template renders declarations, calls and
results — but the two Gemma 4 template generations take results differently: the E-series
template (and the project's generated one) reads ``tool_responses`` on the assistant message
that made the calls, the newer 26B/31B template reads OpenAI-style ``role: tool`` messages and
resolves each ``tool_call_id`` to its call.  ``ToolStyle.probe`` finds out which one a template
speaks by rendering a probe conversation (the result must appear *with its call's name*), so a
checkpoint is served right without a list of template versions; a template that renders
neither is refused with 400 when a request carries tools, never silently dropped.

Client strings the template puts between ``<|"|>`` delimiters (descriptions, enum values,
string arguments, tool results) go in as the prompt builder's text markers, so they are
tokenized as text — a tool result quoting ``<|turn>`` cannot open a turn.  Strings rendered bare
(tool and property names, keys) are refused if they hold a control token.
Pure Python, event-loop thread (called by ``PromptBuilder``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mmserve_core.wire.errors import InvalidArgument
from mmserve_core.wire.types import Message, Tool

Mark = Callable[[str], str]  # client text -> a marker the builder tokenizes as text

_PROBE_NAME, _PROBE_TEXT, _PROBE_ID = "mmserve_probe_fn", "\u2063mmserve-probe-result\u2063", "call_mmserve_probe"


class ToolStyle:
    """What a chat template can render: tool declarations, calls, and how it takes results."""

    def __init__(self, declarations: bool, calls: bool, results: str | None) -> None:
        self.declarations = declarations
        self.calls = calls
        self.results = results  # "role" | "responses" | None

    @classmethod
    def probe(cls, render: Callable[..., str]) -> ToolStyle:
        """``render(messages, **kwargs)`` is the template (no generation prompt)."""

        def safe(messages, **kw) -> str:
            try:
                return render(messages, **kw)
            except Exception:  # noqa: BLE001 - a template that cannot take the probe: not supported
                return ""

        user = {"role": "user", "content": "q"}
        call = {"id": _PROBE_ID, "type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}
        decl = [{"type": "function", "function": {"name": _PROBE_NAME, "description": "",
                                                  "parameters": {"type": "object", "properties": {}}}}]
        declarations = _PROBE_NAME in safe([user], tools=decl)
        calls = _PROBE_NAME in safe([user, {"role": "assistant", "content": "", "tool_calls": [call]}])
        by_role = safe([user, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": _PROBE_ID, "content": _PROBE_TEXT}])
        by_responses = safe([user, {"role": "assistant", "content": "", "tool_calls": [call],
                                    "tool_responses": [{"name": _PROBE_NAME, "response": _PROBE_TEXT}]}])

        def paired(text: str) -> bool:  # the result is there, and so is its call's name beside the call
            return _PROBE_TEXT in text and text.count(_PROBE_NAME) >= 2

        results = "role" if paired(by_role) else "responses" if paired(by_responses) else None
        return cls(declarations, calls, results)


def template_tools(tools: list[Tool], mark: Mark, plain: Callable[[str, str], None]) -> list[dict]:
    """OpenAI-shaped function declarations for the template, client text marked."""
    out = []
    for i, t in enumerate(tools):
        fn: dict[str, Any] = {"name": t.name, "description": mark(t.description) if t.description else ""}
        if t.parameters is not None:
            fn["parameters"] = _schema(t.parameters, mark, plain, f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": fn})
    return out


def _schema(node: Any, mark: Mark, plain, param: str) -> Any:
    """A JSON Schema with its descriptions and enum strings marked, bare strings checked."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            plain(k, param)
            if k == "description" and isinstance(v, str):
                out[k] = mark(v) if v else v
            elif k in ("enum", "const") and isinstance(v, (list, str)):
                out[k] = _value(v, mark, plain, f"{param}.{k}")
            else:
                out[k] = _schema(v, mark, plain, f"{param}.{k}")
        return out
    if isinstance(node, list):
        return [_schema(v, mark, plain, f"{param}[{j}]") for j, v in enumerate(node)]
    if isinstance(node, str):
        plain(node, param)
    return node


def _value(v: Any, mark: Mark, plain, param: str) -> Any:
    """A value the template writes with ``format_argument``: strings quoted (marked), keys bare."""
    if isinstance(v, str):
        return mark(v) if v else v
    if isinstance(v, dict):
        for k in v:
            plain(k, param)
        return {k: _value(x, mark, plain, f"{param}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [_value(x, mark, plain, f"{param}[{j}]") for j, x in enumerate(v)]
    return v


def template_calls(m: Message, mark: Mark, plain) -> list[dict]:
    """An assistant message's calls, arguments as a mapping (what both templates iterate)."""
    calls = []
    for j, c in enumerate(m.tool_calls):
        param = f"{m.param}.tool_calls[{j}].function"
        plain(c.name, f"{param}.name")
        args = json.loads(c.arguments) if c.arguments else {}
        calls.append({"id": c.id, "type": "function",
                      "function": {"name": c.name, "arguments": _value(args, mark, plain, f"{param}.arguments")}})
    return calls


def attach_results(messages: list[Message], style: ToolStyle, build: Callable[[Message], dict]) -> list[dict]:
    """Template messages from the request's: ``build`` makes one message's dict; tool results go
    where ``style`` says.  With ``responses``, a call's results join its assistant message, and
    the answer that followed them too (``call → results → answer`` is one model turn, as the
    model wrote it; a template without that convention would open a second model turn)."""
    needs_results = any(m.role == "tool" for m in messages)
    if needs_results and style.results is None:
        first = next(m for m in messages if m.role == "tool")
        raise InvalidArgument(f"{first.param}: this model's chat template does not render tool results",
                              param=first.param)
    if any(m.tool_calls for m in messages) and not style.calls:
        first = next(m for m in messages if m.tool_calls)
        raise InvalidArgument(f"{first.param}.tool_calls: this model's chat template does not render tool calls",
                              param=f"{first.param}.tool_calls")
    out: list[dict] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        d = build(m)
        i += 1
        if style.results == "role" or not m.tool_calls:
            out.append(d)
            continue
        names = {c.id: c.name for c in m.tool_calls}
        responses = []
        while i < len(messages) and messages[i].role == "tool":
            t = messages[i]
            responses.append({"name": names.get(t.tool_call_id or "", "unknown"), "response": build(t)["content"]})
            i += 1
        if responses:
            d["tool_responses"] = responses
            nxt = messages[i] if i < len(messages) else None
            if not d.get("content") and nxt is not None and nxt.role == "assistant" and not nxt.tool_calls:
                d["content"] = build(nxt)["content"]
                i += 1
        out.append(d)
    return out

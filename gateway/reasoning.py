"""Gemma 4's thought channel, kept out of ``content``.

Why: with thinking enabled Gemma 4 writes ``<|channel>thought\\n…<channel|>``
before its answer; clients must never see that in ``content``.  The parser
splits the decoder's text stream into answer text and reasoning text: the
channel's name line is dropped, its body is reasoning (returned as
``reasoning_content``, or dropped, per request / server default), and stray
channel markers never reach the answer.  The decoder emits each special
token's text whole, so markers never straddle two deltas.
Pure Python; one parser per response, event-loop thread.
"""

from __future__ import annotations

OPEN, CLOSE = "<|channel>", "<channel|>"


class ReasoningParser:
    def __init__(self) -> None:
        self._state = "content"  # content | name | reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """One text delta -> (answer text, reasoning text)."""
        content: list[str] = []
        reasoning: list[str] = []
        while text:
            if self._state == "content":
                i, j = text.find(OPEN), text.find(CLOSE)
                cut = min(x for x in (i, j, len(text)) if x >= 0)
                content.append(text[:cut])
                if cut == len(text):
                    break
                if cut == i:
                    self._state = "name"
                    text = text[cut + len(OPEN):]
                else:  # a close marker with no open one: drop it
                    text = text[cut + len(CLOSE):]
            elif self._state == "name":  # the channel's name, up to the end of its line
                nl, j = text.find("\n"), text.find(CLOSE)
                if j >= 0 and (nl < 0 or j < nl):
                    self._state, text = "content", text[j + len(CLOSE):]
                elif nl >= 0:
                    self._state, text = "reasoning", text[nl + 1:]
                else:
                    break
            else:
                j = text.find(CLOSE)
                if j < 0:
                    reasoning.append(text.replace(OPEN, ""))
                    break
                reasoning.append(text[:j].replace(OPEN, ""))
                self._state, text = "content", text[j + len(CLOSE):]
        return "".join(content), "".join(reasoning)

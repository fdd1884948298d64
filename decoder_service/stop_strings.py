"""Stop strings matched on the detokenized text, across token boundaries.

Why: OpenAI's ``stop`` ends generation when the *text* contains a string,
however the tokenizer split it, and the returned text stops right before
it.  So text is released only once it can no longer be the start of a stop
string: the longest suffix that is a proper prefix of some stop string is
held back (never more), and released when the next delta rules it out.
Pure Python; used on the event loop by ``output_text.OutputText``, one filter per request.
"""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def __bool__(self) -> bool:
        return bool(self.stops)

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add a text delta; return ``(text safe to emit, the stop string matched or None)``."""
        if not self.stops:
            return text, None
        buf = self._held + text
        hit: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is not None:
            self._held = ""
            return buf[: hit[0]], hit[1]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        """Generation ended without a match: release what was held."""
        out, self._held = self._held, ""
        return out

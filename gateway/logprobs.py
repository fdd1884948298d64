"""OpenAI ``logprobs.content`` entries from the decoder's token log-probabilities.

Why: OpenAI clients read ``{"token", "logprob", "bytes", "top_logprobs"}``
per generated token.  Token strings come from the checkpoint's tokenizer
(decoded one id at a time, cached); a log-probability of -inf (a suppressed
token) becomes -9999.0, the value OpenAI documents, because JSON has no
infinity.  Pure Python; event-loop thread.
"""

from __future__ import annotations

import math
from functools import lru_cache

from mmserve_core.wire import types as T

NEG_INF_LOGPROB = -9999.0


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self._decode = lru_cache(maxsize=65536)(
            lambda t: tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def text(self, token_id: int) -> str:
        """One token's text (cached)."""
        return self._decode(int(token_id))

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._decode(int(token_id))
        return {"token": text, "logprob": logprob if math.isfinite(logprob) else NEG_INF_LOGPROB,
                "bytes": list(text.encode("utf-8")), "token_id": int(token_id)}

    def content_json(self, entries: list[T.TokenLogprob]) -> list[dict]:
        """As OpenAI sends it (no ``token_id`` key)."""
        out = self.content(entries)
        for e in out:
            e.pop("token_id")
            for t in e["top_logprobs"]:
                t.pop("token_id")
        return out

    def content(self, entries: list[T.TokenLogprob]) -> list[dict]:
        out = []
        for e in entries:
            item = self._entry(e.token_id, e.logprob)
            item["top_logprobs"] = [self._entry(t, v) for t, v in e.top]
            out.append(item)
        return out

"""Token ids to text, and stop strings, on the event loop — off the MLX thread.

Why: detokenizing and matching stop strings are per-token Python work that is not model work;
done on the MLX thread they sat between one decode step and the next.  As vLLM v1 moved them
out of its engine core, the scheduler now emits token ids only, and each request's consumer
(``DecoderEngine.generate``, on the event loop, where the tokens arrive coalesced) turns them
into text with ``IncrementalDetokenizer`` and ``StopStringFilter``.

A stop string matched here ends the request at the token that completed it: the text stops
right before the string, ``completion_tokens`` counts the tokens up to that one, and the
consumer asks the scheduler to finish the sequence (``GenerationJob.finish_on_cancel`` then
``cancel``).  The scheduler may have decoded a token or two more by then; they are neither
shown nor billed.

Thread ownership: one ``OutputText`` per request, on the event loop.
"""

from __future__ import annotations

import dataclasses

from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.stop_strings import StopStringFilter
from mmserve_core.wire import types as T


class OutputText:
    def __init__(self, tokenizer, stop_strings, logprobs: bool) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringFilter(list(stop_strings))
        self._logprobs = logprobs
        self.count = 0  # tokens shown (and billed)
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def feed(self, ev: T.TokenEvent) -> T.TokenEvent | None:
        """``ev`` with its text; None once a stop string has ended the output."""
        if self.matched is not None:
            return None
        ids, text, lps = [], [], []
        for i, t in enumerate(ev.token_ids):
            delta, matched = self._stops.feed(self._detok.add(t))
            ids.append(t)
            text.append(delta)
            if ev.logprobs:
                lps.append(ev.logprobs[i])
            self.count += 1
            if matched is not None:
                self.matched = matched
                break
        return T.TokenEvent(ids, "".join(text), lps if self._logprobs else None)

    def finish(self, done: T.Completion) -> tuple[T.TokenEvent | None, T.Completion]:
        """The held-back text (if any) and the completion as the client sees it."""
        if self.matched is not None:
            return None, dataclasses.replace(done, finish_reason="stop", stop_string=self.matched,
                                             stop_token_id=None, completion_tokens=self.count)
        tail, matched = self._stops.feed(self._detok.flush())
        if matched is not None:
            done = dataclasses.replace(done, finish_reason="stop", stop_string=matched)
        else:
            tail += self._stops.flush()
        return (T.TokenEvent([], tail, [] if self._logprobs else None) if tail else None), done

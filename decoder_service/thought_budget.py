"""A budget for the thought channel: once a sequence has written ``budget`` tokens inside
``<|channel>…``, the only token it may write next is ``<channel|>``.

Why: Anthropic's ``thinking.budget_tokens`` (and any caller's) must have its effect, not be a
hint: the model thinks at most that long, then answers.  A logits processor per sequence (MLX
thread), like the grammar mask; it reads the prompt once to know whether generation starts
inside an open channel.
"""

from __future__ import annotations

from decoder_service.constraints import new_tokens


class ThoughtBudget:
    def __init__(self, budget: int, open_id: int, close_id: int) -> None:
        self.budget, self.open_id, self.close_id = int(budget), int(open_id), int(close_id)
        self._seen: int | None = None
        self._inside = False
        self._spent = 0

    def _feed(self, tokens) -> None:
        for t in tokens:
            if t == self.open_id:
                self._inside, self._spent = True, 0
            elif t == self.close_id:
                self._inside = False
            elif self._inside:
                self._spent += 1

    def __call__(self, context, logits):
        import mlx.core as mx

        n = int(context.shape[-1])
        if self._seen is None:  # the prompt: only whether it leaves a channel open matters
            self._feed(new_tokens(context, 0))
            self._spent = 0
            self._seen = n
        elif n > self._seen:
            self._feed(new_tokens(context, self._seen))  # what this step added: O(new tokens)
            self._seen = n
        if not (self._inside and self._spent >= self.budget):
            return logits
        only = mx.arange(logits.shape[-1]) == self.close_id
        return mx.where(only, logits, mx.array(-mx.inf, dtype=logits.dtype))

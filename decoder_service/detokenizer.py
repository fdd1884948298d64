"""Incremental detokenization: text deltas that are exactly ``decode(all tokens)``.

Why: decoding token by token breaks multi-byte UTF-8 characters and
SentencePiece spacing.  We use the prefix/read-offset scheme of TGI and vLLM:
decode a short window of recent tokens, emit only the new suffix, and hold
text back while it ends in an incomplete character (U+FFFD).  Works for any
Hugging Face tokenizer.  Pure Python; used on the event loop by ``output_text.OutputText``.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Return any held-back text at the end of generation."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

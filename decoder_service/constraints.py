"""Output constraints: a JSON schema, JSON object, regex or Lark grammar, enforced token by token.

Why: a ``response_format`` (or a forced tool call) that is only hinted in the
prompt is the field's most common bug in other servers; here the decoder
masks every sampled position to the tokens that keep the output valid, and
allows end-of-sequence only where the output is complete.  The grammar work
is llguidance's (installed with mlx-vlm; its Earley parser over the token
trie computes a mask in ~0.1 ms a token on the tiny checkpoint); the mask is
applied with plain MLX ops, so it runs on the CPU, Metal and CUDA alike
(llguidance's own ``mlx`` helper and mlx-vlm's use a Metal-only kernel).

Thread ownership: ``ConstraintCompiler`` runs on the event loop — grammars
are checked and compiled there, cached by digest, never on the MLX thread;
each request gets its own ``LLMatcher`` built there too.  ``GrammarMask``
is a logits processor called on the MLX thread, one per sequence.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from mmserve_core.wire.errors import CONSTRAINT_REFUSAL, InvalidArgument
from mmserve_core.wire.types import Constraint

MAX_CACHED_GRAMMARS = 256
REFUSAL = CONSTRAINT_REFUSAL  # every refusal starts so: the gateway names the request's field from it
# JSON without free-form whitespace: a model (a random-weight one above all) cannot spend its
# budget on blanks, and the output is what json.dumps(separators=(",", ":")) would give.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class CompiledGrammar:
    digest: str
    grammar: str


class ConstraintCompiler:
    """Checks and compiles constraints into llguidance grammars (event loop; cached by digest)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=self.eos_ids)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def compile(self, c: Constraint) -> CompiledGrammar:
        digest = hashlib.sha256(f"{c.kind}\0{c.spec}".encode()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            return hit
        from llguidance import LLMatcher

        grammar = _grammar(c)
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidArgument(f"{REFUSAL} ({c.kind}) cannot be enforced: {error.strip()}")
        compiled = CompiledGrammar(digest, grammar)
        self._cache[digest] = compiled
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled: CompiledGrammar):
        """A fresh matcher for one sequence (llguidance drops the GIL while it builds)."""
        from llguidance import LLMatcher

        m = LLMatcher(self.tokenizer, compiled.grammar, log_level=0)
        if m.is_error():
            raise InvalidArgument(f"{REFUSAL} cannot be enforced: {m.get_error()}")
        return m


def _grammar(c: Constraint) -> str:
    from llguidance import LLMatcher

    if c.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if c.kind == "json_schema":
        try:
            schema = json.loads(c.spec)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{REFUSAL} (json_schema) is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument(f"{REFUSAL} (json_schema) must be a JSON object")
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidArgument(f"{REFUSAL} (json_schema) cannot be enforced: {e}") from None
    if c.kind == "regex":
        return LLMatcher.grammar_from_regex(c.spec)
    if c.kind == "lark":
        return LLMatcher.grammar_from_lark(c.spec)
    raise InvalidArgument(f"{REFUSAL} has an unknown kind {c.kind!r}")


class GrammarMask:
    """Logits processor for one sequence (MLX thread): feeds the matcher the tokens generated
    since its last call, then adds -inf to every token the grammar does not allow next.

    ``context`` is the sequence's tokens so far (prompt + generated), as mlx-lm's batch and our
    solo loop pass it; the first call sees the prompt and consumes nothing."""

    def __init__(self, matcher, vocab_size: int, eos_ids: list[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = np.asarray(eos_ids, dtype=np.int64)
        self._seen: int | None = None
        self._shifts = None  # mx.arange(32), made on first use on the MLX thread

    def __call__(self, context, logits):
        import mlx.core as mx

        n = int(context.shape[-1])
        if self._seen is None:
            self._seen = n
        elif n > self._seen:
            # read the new tokens *before* launching this step's forward pass, so the read waits for
            # the previous sample only (read after the launch, it queues behind the whole forward)
            for t in np.asarray(context).reshape(-1)[self._seen:].tolist():
                self.matcher.consume_token(int(t))
            self._seen = n
        mx.async_eval(logits)  # the forward pass runs while the matcher computes the mask
        width = logits.shape[-1]
        if self.matcher.is_error():  # cannot happen while the mask is applied; end the sequence if it does
            allowed = np.zeros(width, dtype=bool)
            allowed[self.eos[self.eos < width]] = True
            return logits + mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32)).astype(logits.dtype)
        if self._shifts is None:
            self._shifts = mx.arange(32, dtype=mx.uint32)
        words = mx.array(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32))
        bits = (words[:, None] >> self._shifts) & 1  # [words, 32]: bit j of word i is token 32 i + j
        bits = bits.reshape(-1)[: min(width, self.vocab_size)]
        if bits.shape[0] < width:
            bits = mx.concatenate([bits, mx.zeros((width - bits.shape[0],), dtype=bits.dtype)])
        return mx.where(bits.astype(mx.bool_), logits, mx.array(-mx.inf, dtype=logits.dtype))

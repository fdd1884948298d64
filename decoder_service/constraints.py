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
(one per sequence) and ``BatchMasks`` (one per scheduler) run on the MLX
thread: a sequence's prefill and solo steps call its ``GrammarMask``; in the
batch, ``BatchMasks`` masks every constrained row of a step at once — the
matchers fill one bitmask in parallel (llguidance's executor, off the GIL)
while the forward pass runs, and one MLX ``where`` applies it.
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


def _bits(words, width: int, vocab_size: int):
    """uint32 words [..., W] -> bool [..., width]: bit j of word i is token 32 i + j."""
    import mlx.core as mx

    bits = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    bits = bits.reshape(*words.shape[:-1], -1)[..., : min(width, vocab_size)]
    if bits.shape[-1] < width:
        pad = mx.zeros((*bits.shape[:-1], width - bits.shape[-1]), dtype=bits.dtype)
        bits = mx.concatenate([bits, pad], axis=-1)
    return bits.astype(mx.bool_)


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

    def consume(self, token: int) -> None:
        """The batch path: the token this sequence sampled last (``BatchMasks`` reads it)."""
        self.matcher.consume_token(int(token))
        if self._seen is not None:
            self._seen += 1

    def eos_only(self, width: int) -> np.ndarray:
        allowed = np.zeros(width, dtype=bool)
        allowed[self.eos[self.eos < width]] = True
        return allowed

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
            return mx.where(mx.array(self.eos_only(width)), logits, mx.array(-mx.inf, dtype=logits.dtype))
        words = mx.array(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32))
        return mx.where(_bits(words, width, self.vocab_size), logits, mx.array(-mx.inf, dtype=logits.dtype))


class BatchMasks:
    """Masks a batch step's constrained rows at once (MLX thread; one per scheduler).

    ``apply(inputs, logits, rows)``: ``inputs`` [B, 1] are the tokens the rows sampled last (not
    yet consumed by their matchers), ``logits`` [B, 1, V] this step's (not yet evaluated),
    ``rows`` the ``GrammarMask`` of each row or None, ``skip`` (per row) true where the input is
    a prompt token (a row's first step after a batched prefill).  The tokens are read before the forward pass
    is launched (so the read waits for the previous sample only), then the matchers consume them
    and fill one bitmask in parallel while the forward runs; one ``where`` applies it."""

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self._executor = None

    def apply(self, inputs, logits, rows: list, skip: list[bool] | None = None):
        import llguidance
        import llguidance.numpy as lnp
        import mlx.core as mx

        tokens = np.asarray(inputs).reshape(-1).tolist()
        mx.async_eval(logits)
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self.threads)
        vocab = next(r.vocab_size for r in rows if r is not None)
        width, words = logits.shape[-1], (vocab + 31) // 32
        bitmask = np.full((len(rows), words), -1, dtype=np.int32)  # unconstrained rows: every token
        work, broken = [], []
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if r is None:
                continue
            if not (skip and skip[i]):
                r.consume(t)
            (broken if r.matcher.is_error() else work).append((r.matcher, i))
        if work:
            lnp.fill_next_token_bitmask_par(self._executor, work, bitmask)
        allowed = _bits(mx.array(bitmask.view(np.uint32)), width, vocab)
        if broken:  # cannot happen while the mask is applied; such a row may only end
            fix = np.ones((len(rows), width), dtype=bool)
            for _, i in broken:
                fix[i] = rows[i].eos_only(width)
            allowed = allowed & mx.array(fix)
        return mx.where(allowed[:, None, :], logits, mx.array(-mx.inf, dtype=logits.dtype))

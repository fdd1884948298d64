"""Output constraints: a JSON schema, JSON object, regex or Lark grammar, enforced token by token.

Why: a ``response_format`` (or a forced tool call) that is only hinted in the
prompt is the field's most common bug in other servers; here the decoder
masks every sampled position to the tokens that keep the output valid, and
allows end-of-sequence only where the output is complete.  The grammar work
is llguidance's (installed with mlx-vlm; its Earley parser over the token
trie computes a mask in ~0.1 ms a token on the tiny checkpoint); the mask is
applied with plain MLX ops, so it runs on the CPU, Metal and CUDA alike
(llguidance's own ``mlx`` helper and mlx-vlm's use a Metal-only kernel).

Thread ownership: ``ConstraintCompiler`` runs in the event loop's worker
threads (``engine.validate_async``) — grammars are checked and compiled
there, cached by digest (under a lock), never on the MLX thread nor on the
loop itself; each request gets its own ``LLMatcher`` built there too.  ``GrammarMask``
(one per sequence) and ``BatchMasks`` (one per scheduler) run on the MLX
thread: a sequence's prefill and solo steps call its ``GrammarMask``; in the
batch, ``BatchMasks`` masks every constrained row of a step at once — the
matchers fill one bitmask in parallel (llguidance's executor, off the GIL)
while the forward pass runs, and one MLX ``where`` applies it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from mmserve_core.wire.errors import CONSTRAINT_REFUSAL, InvalidArgument
from mmserve_core.wire.types import Constraint

MAX_CACHED_GRAMMARS = 256
REFUSAL = CONSTRAINT_REFUSAL  # every refusal starts so: the gateway names the request's field from it
# JSON without free-form whitespace: a model (a random-weight one above all) cannot spend its
# budget on blanks, and the output is what json.dumps(separators=(",", ":")) would give.  And never
# one of llguidance's inexact modes, whatever a schema's own "x-guidance" asks (these overrides win):
# ``coerce_one_of`` reads oneOf as anyOf, ``lenient`` ignores unsupported keywords and formats (and
# implies coerce_one_of) — either lets a reply through that the schema rejects.  Exclusive oneOf
# branches are llguidance's default (it turns a oneOf into anyOf where it proves them disjoint);
# ``_prepare`` inlines $ref branches so that it can see them, and drops unknown formats.
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": False, "lenient": False}
# keywords whose values are data, not schemas (left as they are)
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example", "x-guidance"})
_NAME_MAPS = frozenset({"properties", "patternProperties", "definitions", "$defs", "dependentSchemas",
                        "dependencies"})
_known_formats: dict[str, bool] = {}
# llguidance's lexer gives up mid-reply (its per-token fuel) on a long maxLength intersected with a
# pattern (measured: maxLength 5000 with "^(?:\S+\s+){0,99}\S+$"): beside a pattern, maxLength is
# capped here — a subset (shorter strings only), so every reply still validates.
PATTERN_LENGTH_CAP = 256


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
        self._lock = threading.Lock()  # requests compile in worker threads (engine.validate_async)

    def compile(self, c: Constraint) -> CompiledGrammar:
        digest = hashlib.sha256(f"{c.kind}\0{c.spec}".encode()).hexdigest()
        with self._lock:
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
        with self._lock:
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
            return LLMatcher.grammar_from_json_schema(_prepare(schema), overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidArgument(f"{REFUSAL} (json_schema) cannot be enforced: {e}") from None
    if c.kind == "regex":
        return LLMatcher.grammar_from_regex(c.spec)
    if c.kind == "lark":
        return LLMatcher.grammar_from_lark(c.spec)
    raise InvalidArgument(f"{REFUSAL} has an unknown kind {c.kind!r}")


def _prepare(schema):
    """The schema as llguidance is given it, meaning the same to a validator:

    * a ``format`` llguidance does not know is dropped: ``format`` is an annotation unless a
      validator opts in (draft 2019-09 on; ``jsonschema`` checks none by default), and llguidance
      refuses formats it does not know (it enforces the ones it knows);
    * a ``oneOf`` branch that is only a local ``$ref`` is replaced by its target (once), so that
      llguidance's own exclusivity check — which cannot see through a $ref — can prove the
      branches disjoint (their meaning is the same);
    * beside a ``pattern``, a ``maxLength`` above ``PATTERN_LENGTH_CAP`` is capped (a subset);
    * a ``minProperties`` that extra keys (``additionalProperties`` / ``patternProperties``) would
      have to reach two or more of is refused: llguidance does not keep extra keys apart, and a key
      written twice counts once (measured: ``{"minProperties": 6}`` came back with 5 keys)."""
    if not isinstance(schema, dict):
        return schema
    return _walk(schema, schema, inline=True)


def _walk(node, root, inline: bool):
    if isinstance(node, list):
        return [_walk(x, root, inline) for x in node]
    if not isinstance(node, dict):
        return node
    _distinct_keys(node)
    out = {}
    for k, v in node.items():
        if k == "format" and isinstance(v, str) and not _known_format(v):
            continue
        lo = node.get("minLength", 0)
        if k == "maxLength" and isinstance(node.get("pattern"), str) and type(v) is int and type(lo) is int \
                and v > PATTERN_LENGTH_CAP >= lo:
            v = PATTERN_LENGTH_CAP
        if k in _DATA_KEYWORDS:
            out[k] = v
        elif k in _NAME_MAPS and isinstance(v, dict):
            out[k] = {name: _walk(x, root, inline) for name, x in v.items()}
        elif k == "oneOf" and isinstance(v, list) and inline:
            out[k] = [_walk(_target(x, root), root, inline=False) for x in v]
        else:
            out[k] = _walk(v, root, inline)
    return out


def _distinct_keys(node: dict) -> None:
    m = node.get("minProperties")
    if type(m) is not int:
        return
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = node.get("required") if isinstance(node.get("required"), list) else []
    named = set(props) | {r for r in required if isinstance(r, str)}
    closed = node.get("additionalProperties") is False and not node.get("patternProperties")
    if m - len(named) >= 2 and not closed:
        raise InvalidArgument(f"{REFUSAL} (json_schema) cannot be enforced: minProperties {m} needs "
                              f"{m - len(named)} distinct keys beyond the named ones, which the grammar cannot "
                              "keep apart (the same key written twice counts once)")


def _target(branch, root):
    """A branch that is a local ``$ref`` (beside annotations only) -> its target; else the branch."""
    if not isinstance(branch, dict) or not isinstance(branch.get("$ref"), str):
        return branch
    if any(k not in ("$ref", "description", "title", "$comment", "examples", "default") for k in branch):
        return branch
    ref = branch["$ref"]
    if not ref.startswith("#/"):
        return branch
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return branch
    if not isinstance(node, dict) or "$id" in node or isinstance(node.get("id"), str) or "$ref" in node:
        return branch  # a resource of its own, or a chain of refs: left to llguidance
    return node


def _known_format(name: str) -> bool:
    hit = _known_formats.get(name)
    if hit is None:
        from llguidance import LLMatcher

        g = LLMatcher.grammar_from_json_schema({"type": "string", "format": name}, overrides=_JSON_OPTIONS)
        if len(_known_formats) > 1024:  # bounded: format names come from clients
            _known_formats.clear()
        hit = _known_formats[name] = not LLMatcher.validate_grammar(g)
    return hit


def new_tokens(context, seen: int) -> list[int]:
    """The tokens of ``context`` (a sequence's ids so far: an MLX array as mlx-lm passes it, or a
    list / numpy array) after the first ``seen`` — sliced *before* leaving MLX, so a step reads what
    it added, not the whole sequence again (which made a sequence's masking O(n²))."""
    tail = context.reshape(-1)[seen:] if hasattr(context, "reshape") else context[seen:]
    return np.asarray(tail).reshape(-1).tolist()


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

    def masked(self, logits):
        """``logits`` with every token the grammar does not allow next at -inf, consuming nothing
        (a drafting round's walk: it consumes what it accepts with ``consume``)."""
        import mlx.core as mx

        width = logits.shape[-1]
        if self.matcher.is_error():
            allowed = mx.array(self.eos_only(width))
        else:
            allowed = _bits(mx.array(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)), width,
                            self.vocab_size)
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

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
            for t in new_tokens(context, self._seen):
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

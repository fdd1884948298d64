"""Constrained decoding's cost: compile cold vs cached, mask time per token, decode tokens/s at 1 and
8 streams with a JSON-schema constraint vs without (``python -m tests.tooling.bench_constraints``).

Prints a table; not a test.  The decoder runs as its own process on a generated tiny checkpoint
(or ``--checkpoint``); every stream asks for ``--tokens`` tokens, EOS suppressed, under a schema
whose strings are long enough that the budget, not the grammar, ends the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# At least 40 notes: no reply can be complete within the token budget, so every stream (constrained
# or not) decodes the same number of tokens through keys, strings, numbers and array structure.
SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "minItems": 40, "maxItems": 50, "items": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 40},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 10**6}},
    "required": ["text", "n"], "additionalProperties": False}}},
    "required": ["notes"], "additionalProperties": False}


def _compile_and_mask(ckpt: str) -> tuple[float, float, float]:
    import mlx.core as mx
    from transformers import AutoTokenizer

    from decoder_service.constraints import ConstraintCompiler, GrammarMask
    from mmserve_core.runtime.checkpoint import read_checkpoint
    from mmserve_core.wire.types import Constraint

    info = read_checkpoint(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    compiler = ConstraintCompiler(tok, info.vocab_size, info.eos_token_ids([tok.eos_token_id]))
    c = Constraint("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    compiled = compiler.compile(c)
    compiler.matcher(compiled)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.matcher(compiler.compile(c))
    cached = time.perf_counter() - t0
    mask = GrammarMask(compiler.matcher(compiled), info.vocab_size, compiler.eos_ids)
    rng = np.random.default_rng(0)
    context, logits, times = [2, 105, 10, 106, 105], mx.zeros((1, info.vocab_size)), []
    for _ in range(200):
        t0 = time.perf_counter()
        out = mask(mx.array(context), logits)
        mx.eval(out)
        times.append(time.perf_counter() - t0)
        allowed = np.nonzero(np.isfinite(np.asarray(out)[0]))[0]
        allowed = [t for t in allowed if t not in compiler.eos_ids] or list(allowed)
        context.append(int(rng.choice(allowed)))
    return cold * 1000, cached * 1000, statistics.median(times) * 1000


async def _streams(addr: str, n: int, tokens: int, eos: list[int], constrained: bool) -> tuple[float, float]:
    """``(decode tokens/s over all streams, median time to first token in ms)``: the decode rate
    counts from the first stream's first token to the last stream's last, so setup (grammar compile,
    matcher) shows in the TTFT column and not in the rate."""
    from mmserve_core.client import AsyncDecoderClient, TokenEvent
    from mmserve_core.wire.types import Constraint

    client = AsyncDecoderClient(addr)
    kw = {"constraint": Constraint("json_schema", json.dumps(SCHEMA))} if constrained else {}

    async def one(i: int) -> tuple[int, float, float, float]:
        got, t0, first = 0, time.perf_counter(), None
        async for ev in client.generate([2, 105, 10 + i, 106, 105], temperature=1.0, seed=i, max_tokens=tokens,
                                        logit_bias={t: -100.0 for t in eos}, **kw):
            if isinstance(ev, TokenEvent) and ev.token_ids:
                first = first or time.perf_counter()
                got += len(ev.token_ids)
        return got - 1, first, time.perf_counter(), (first - t0) * 1000

    await asyncio.gather(*(one(i) for i in range(n)))  # warm-up
    runs = await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    total = sum(r[0] for r in runs)
    return total / (max(r[2] for r in runs) - min(r[1] for r in runs)), statistics.median(r[3] for r in runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.tooling.bench_constraints", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint dir (default: a generated tiny E2B-shaped one)")
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args(argv)
    from deploy.processes import start_decoder
    from mmserve_core.runtime.checkpoint import read_checkpoint
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    ckpt = args.checkpoint or str(write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="mmserve-bench-c-")) / "tiny"))
    cold, cached, mask_ms = _compile_and_mask(ckpt)
    print(f"\ncheckpoint: {ckpt}\ngrammar compile + matcher: cold {cold:.2f} ms, cached {cached:.2f} ms; "
          f"mask per token {mask_ms:.3f} ms")
    eos = read_checkpoint(ckpt).eos_token_ids()
    with start_decoder(ckpt, ["--prefix-cache-bytes", "0"]) as svc:
        print(f"{'streams':>8} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6} {'free TTFT ms':>13} "
              f"{'schema TTFT ms':>15}")
        for n in (1, 8):
            free, free_ttft = asyncio.run(_streams(svc.decoder_addr, n, args.tokens, eos, False))
            cons, cons_ttft = asyncio.run(_streams(svc.decoder_addr, n, args.tokens, eos, True))
            print(f"{n:>8} {free:>11.1f} {cons:>13.1f} {cons / free:>6.2f} {free_ttft:>13.1f} {cons_ttft:>15.1f}")


if __name__ == "__main__":
    main()

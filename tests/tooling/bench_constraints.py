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

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "maxItems": 50, "items": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 400},
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


async def _streams(addr: str, n: int, tokens: int, eos: list[int], constrained: bool) -> float:
    from mmserve_core.client import AsyncDecoderClient, TokenEvent
    from mmserve_core.wire.types import Constraint

    client = AsyncDecoderClient(addr)
    kw = {"constraint": Constraint("json_schema", json.dumps(SCHEMA))} if constrained else {}

    async def one(i: int) -> int:
        got = 0
        async for ev in client.generate([2, 105, 10 + i, 106, 105], temperature=1.0, seed=i, max_tokens=tokens,
                                        logit_bias={t: -100.0 for t in eos}, **kw):
            if isinstance(ev, TokenEvent):
                got += len(ev.token_ids)
        return got

    await asyncio.gather(*(one(i) for i in range(n)))  # warm-up
    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(i) for i in range(n))))
    dt = time.perf_counter() - t0
    await client.close()
    return total / dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.tooling.bench_constraints", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint dir (default: a generated tiny E2B-shaped one)")
    ap.add_argument("--tokens", type=int, default=128)
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
        print(f"{'streams':>8} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6}")
        for n in (1, 8):
            free = asyncio.run(_streams(svc.decoder_addr, n, args.tokens, eos, False))
            cons = asyncio.run(_streams(svc.decoder_addr, n, args.tokens, eos, True))
            print(f"{n:>8} {free:>11.1f} {cons:>13.1f} {cons / free:>6.2f}")


if __name__ == "__main__":
    main()

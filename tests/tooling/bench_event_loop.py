"""How long the decoder's event loop is held while it serves constrained streams (a table, not a test).

``python -m tests.tooling.bench_event_loop [--streams 8] [--rounds 3]`` runs the decoder engine in this
process on a tiny checkpoint and, on its event loop, a probe that sleeps 1 ms again and again and
records how late it wakes (the loop's lag: what every other stream's next token waits behind).  Meanwhile
``--streams`` requests arrive together, each with its own JSON schema (a fresh grammar to compile) and
image embeddings (bytes the prefix cache hashes), and stream their tokens through the same path as the
gRPC servicer (``validate_async`` → ``generate``).  Printed: the lag's p50 / p99 / max, with the checks
run on the loop (``--inline``: ``validate``, as before) and off it (the default).  Target: p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _schema(i: int) -> dict:
    props = {f"field_{i}_{j}": {"type": "string", "maxLength": 8} if j % 2 else
             {"type": "integer", "minimum": 0, "maximum": 10 ** (j % 6 + 1)} for j in range(40)}
    return {"type": "object", "properties": props, "required": sorted(props)[:20], "additionalProperties": False}


async def _run(engine, streams: int, inline: bool, max_tokens: int) -> list[float]:
    from mmserve_core.wire import types as T
    from mmserve_core.wire.tensors import RawTensor
    from tests.tooling.tiny_checkpoint import IDS

    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t0 - 0.001) * 1000.0)

    rng = np.random.default_rng(0)
    hidden = engine.info.hidden_size

    async def one(i: int) -> None:
        rows = 256
        ids = [2, 105, 10 + i, 11, IDS["<|image>"], *[IDS["<|image|>"]] * rows, IDS["<image|>"], 106, 105, 11]
        data = rng.standard_normal((rows, hidden)).astype(np.float32)
        span = T.SpanEmbedding(T.Span(5, rows, T.IMAGE), RawTensor(data.tobytes(), "float32", (rows, hidden)))
        s = T.SamplingParams(temperature=1.0, max_tokens=max_tokens,
                             constraint=T.Constraint("json_schema", json.dumps(_schema(i + 1000 * len(lags)))))
        declared = [(span.span, "float32", (rows, hidden))]
        resolved = engine.validate(ids, declared, s) if inline else await engine.validate_async(ids, declared, s)
        async for _ in engine.generate(ids, [span], resolved, []):
            pass

    task = asyncio.ensure_future(probe())
    await asyncio.gather(*(one(i) for i in range(streams)))
    stop.set()
    await task
    return lags


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args(argv)
    from decoder_service.config import DecoderConfig
    from decoder_service.engine import DecoderEngine
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny-e2b", dtype="float32")

        async def go():
            engine = DecoderEngine(DecoderConfig(checkpoint=str(ckpt), port=0, max_active=16))
            engine.start()
            await engine.wait_ready()
            try:
                print(f"{'checks':<10} {'round':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'samples':>8}")
                for inline in (True, False):
                    for r in range(a.rounds):
                        lags = sorted(await _run(engine, a.streams, inline, a.max_tokens))
                        p50, p99 = (_pct(lags, q) for q in (0.5, 0.99))
                        print(f"{'on loop' if inline else 'off loop':<10} {r:>5} {p50:>8.2f} {p99:>8.2f} "
                              f"{lags[-1]:>8.2f} {len(lags):>8}")
            finally:
                engine.stop()

        asyncio.run(go())


if __name__ == "__main__":
    main()

"""``mmserve-bench-decoder``: continuous batching, prefix cache and bandwidth use of the decoder.

Prints tables (never asserts — timings belong in benchmarks, not tests), on a
generated checkpoint whose language model is wide enough (``--lm-width``)
that reading its weights, not Python, dominates a decode step here:

1. aggregate decode tokens/s at 1, 2, 4, 8 and 16 concurrent streams
   (target: ≥ 4× at 8 streams vs 1);
2. TTFT of a conversation's second turn with its first turn in the prefix
   cache vs. the same prompt cold (target: ≤ 0.25×);
3. single-stream decode tokens/s against the memory-bandwidth bound (measured read bandwidth ÷
   bytes of weights read per token), for two bandwidths side by side: the hardware's (a
   streaming read outside MLX on all cores) and MLX's own CPU reduction — the first is the
   machine's limit, the second only what MLX's reduction reaches;
4. a burst of ``--burst`` concurrent ``Generate`` calls: how many were refused
   (``RESOURCE_EXHAUSTED``) and how long until every decode slot was generating
   (target: none refused while a slot is free; all 16 slots busy within 2 s);
5. the in-process anchor: mlx-lm's own ``BatchGenerator`` on the same checkpoint, in this
   process, at the same stream counts and prompt shapes, and the services' aggregate as a
   ratio of it (target: ≥ 0.95 at 8 streams);
6. ``--kv-bits 8`` and ``4``: KV bytes per cached token against full precision (target at 4
   bits: ≤ 0.3x) and greedy agreement of second turns served from the quantized prefix
   cache with the same turns at full precision (reported, not a target).

The decoder is its own OS process on loopback, spoken to over gRPC.  This process
runs on the same BLAS as the decoder (it re-execs with OpenBLAS preloaded, as the
services do), so the anchor is a fair one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np


def _lm_bytes_per_token(ckpt: Path) -> int:
    """Weight bytes a decode step reads: the LM minus tables it only gathers rows from."""
    total = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__" or not name.startswith("language_model."):
                continue
            if "embed_tokens_per_layer" in name:
                continue  # per-layer embeddings: one row per token is gathered
            total += meta["data_offsets"][1] - meta["data_offsets"][0]
    return total


def _hardware_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> tuple[float, int]:
    """``(bytes/s, threads)``: a streaming read outside MLX on all cores — numpy sums one slice of a
    1 GiB array per thread (its loops drop the GIL), best of N.  The machine's own limit, which
    MLX's CPU reduction (``_read_bandwidth``) does not reach.  On Apple silicon this is the CPU
    cores' share of the unified memory bandwidth, below what the GPU reads."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    threads = os.cpu_count() or 1
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return nbytes / best, threads


def _read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s MLX reads on this device (a reduction over a large array, best of N)."""
    import mlx.core as mx

    a = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a.sum())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


async def _generate(client, ids: list[int], max_tokens: int, no_stop: list[int]):
    """-> (ttft s, token arrival times, token ids, completion), through the public asyncio client."""
    from mmserve_core.client import TokenEvent

    t0 = time.perf_counter()
    times, toks, done = [], [], None
    async for ev in client.generate(ids, temperature=0.0, max_tokens=max_tokens,
                                    logit_bias={t: -100.0 for t in no_stop}):
        if isinstance(ev, TokenEvent):
            now = time.perf_counter()
            times += [now] * len(ev.token_ids)
            toks += list(ev.token_ids)
        else:
            done = ev
    return times[0] - t0, times, toks, done


def _client(addr: str):
    from mmserve_core.client import AsyncDecoderClient

    return AsyncDecoderClient(addr)


def _prompt(rng, n: int) -> list[int]:
    return [2, 105] + [int(x) for x in rng.integers(10, 240, n)] + [106, 105, 11]


async def _aggregate(addr: str, streams: int, tokens: int, eos: list[int]) -> tuple[float, float]:
    client = _client(addr)
    rng = np.random.default_rng(streams)
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(_generate(client, _prompt(rng, 32), tokens, eos) for _ in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    total = sum(len(r[2]) for r in runs)
    per_stream = statistics.median((len(r[1]) - 1) / (r[1][-1] - r[1][0]) for r in runs)
    return total / wall, per_stream


async def _burst(addr: str, n: int, tokens: int, eos: list[int], slots: int) -> dict:
    """``n`` calls at once: refused count, and when the ``slots``-th stream got its first token."""
    import grpc

    client = _client(addr)
    rng = np.random.default_rng(77)

    async def one():
        try:
            return await _generate(client, _prompt(rng, 32), tokens, eos)
        except grpc.aio.AioRpcError as e:
            return e.code()

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    served = [r for r in runs if not isinstance(r, grpc.StatusCode)]
    refused = sum(1 for r in runs if r == grpc.StatusCode.RESOURCE_EXHAUSTED)
    firsts = sorted(r[1][0] - t0 for r in served)
    return {"refused": refused, "other_errors": n - len(served) - refused, "served": len(served),
            "all_busy_s": firsts[slots - 1] if len(firsts) >= slots else float("nan"),
            "wall_s": wall, "tok_s": sum(len(r[2]) for r in served) / wall}


def _anchor(ckpt: Path, streams: list[int], tokens: int, eos: list[int]) -> dict[int, float]:
    """mlx-lm's ``BatchGenerator`` in this process: aggregate tok/s (wall, prefill included, the
    same prompt shapes and bias as ``_aggregate``) per stream count."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_logits_processors

    from decoder_service.model import LanguageModelRunner

    runner = LanguageModelRunner(ckpt)
    forward = runner.logits_model()
    bias = make_logits_processors(logit_bias={t: -100.0 for t in eos})
    out = {}
    for c in [2, *streams]:  # the first: warm-up
        rng = np.random.default_rng(c)
        bg = BatchGenerator(forward, completion_batch_size=max(streams), prefill_batch_size=max(streams))
        t0 = time.perf_counter()
        bg.insert([_prompt(rng, 32) for _ in range(c)], max_tokens=[tokens] * c,
                  caches=[runner.lm.make_cache() for _ in range(c)], logits_processors=[bias] * c)
        total, left = 0, c
        while left:
            _, responses = bg.next()
            total += len(responses)
            left -= sum(1 for r in responses if r.finish_reason is not None)
        out[c] = total / (time.perf_counter() - t0)
        bg.close()
        mx.clear_cache()
    return out


async def _kv_turns(addr: str, eos: list[int], conversations: int, turn1_len: int, tokens: int):
    """Second turns (served from the prefix cache) of ``conversations`` conversations, and the
    cache's KV bytes per token afterwards (scraped from the decoder's metrics)."""
    client = _client(addr)
    out = []
    for k in range(conversations):
        turn1 = _prompt(np.random.default_rng(7000 + k), turn1_len)
        _, _, reply, _ = await _generate(client, turn1, 8, eos)
        turn2 = turn1 + reply + [106, 105, 12, 13, 14, 106, 105, 11]
        _, _, toks, done = await _generate(client, turn2, tokens, eos)
        out.append((toks, done.cached_tokens))
    await client.close()
    return out


def _kv_bytes_per_token(logs: str) -> float:
    import re
    import urllib.request

    url = re.search(r"metrics listening\s+address=(\S+)", logs).group(1)
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    kv = float(re.search(r"^mmserve_decoder_prefix_cache_kv_bytes ([0-9.e+-]+)$", text, re.M).group(1))
    n = float(re.search(r"^mmserve_decoder_prefix_cache_tokens ([0-9.e+-]+)$", text, re.M).group(1))
    return kv / n if n else float("nan")


def _kv_quantization(ckpt: Path, eos: list[int], conversations: int = 6, turn1_len: int = 1000,
                     tokens: int = 32) -> list[tuple]:
    from deploy.processes import start_decoder

    runs = {}
    for bits in (None, 8, 4):
        args = ["--metrics-port", "0"] + (["--kv-bits", str(bits)] if bits else [])
        with start_decoder(ckpt, args) as svc:
            turns = asyncio.run(_kv_turns(svc.decoder_addr, eos, conversations, turn1_len, tokens))
            runs[bits] = (turns, _kv_bytes_per_token(svc.logs("decoder")))
    full, full_bpt = runs[None]
    rows = []
    for bits in (None, 8, 4):
        turns, bpt = runs[bits]
        same = sum(a[0] == b[0] for a, b in zip(turns, full))
        prefix = statistics.mean(next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), len(a[0]))
                                 for a, b in zip(turns, full))
        rows.append((bits or "full", bpt, bpt / full_bpt, same, len(turns), prefix, min(t[1] for t in turns)))
    return rows


async def _turn2(addr: str, prompt_len: int, eos: list[int], repeats: int) -> tuple[float, float, int]:
    client = _client(addr)
    warm, cold, hit = [], [], 0
    for k in range(repeats):
        rng = np.random.default_rng(1000 + k)
        turn1 = _prompt(rng, prompt_len)
        _, _, reply, _ = await _generate(client, turn1, 8, eos)
        turn2 = turn1 + reply + [106, 105, 12, 13, 14, 106, 105, 11]
        ttft, _, _, done = await _generate(client, turn2, 2, eos)
        warm.append(ttft)
        hit = done.cached_tokens
        other = _prompt(np.random.default_rng(5000 + k), len(turn2) - 5)  # same length, never seen
        ttft, _, _, _ = await _generate(client, other, 2, eos)
        cold.append(ttft)
    await client.close()
    return statistics.median(warm) * 1000, statistics.median(cold) * 1000, hit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmserve-bench-decoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint dir (default: a generated wide-LM tiny one)")
    ap.add_argument("--lm-width", type=int, default=32768, help="MLP width of the generated LM")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights of the generated LM (MLX's CPU backend computes bf16 in software; "
                         "on Apple silicon use bfloat16)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--turn1-tokens", type=int, default=1500)
    ap.add_argument("--burst", type=int, default=100, help="concurrent calls of the burst (0 = skip)")
    ap.add_argument("--max-queue", type=int, default=64, help="the decoder's --max-queue for the run")
    ap.add_argument("--no-anchor", action="store_true", help="skip the in-process BatchGenerator anchor")
    ap.add_argument("--no-kv-bits", action="store_true", help="skip the quantized prefix cache section")
    args = ap.parse_args(argv)

    from mmserve_core.runtime.blas import blas_in_use, preload_optimized_blas

    preload_optimized_blas()  # the decoder's BLAS, so the in-process anchor is a fair one

    from deploy.processes import start_decoder
    from mmserve_core.runtime.checkpoint import read_checkpoint
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mmserve-bench-dec-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else write_tiny_checkpoint(
        tmp / "wide-lm", variant="e2b", dtype=args.dtype, lm_intermediate_size=args.lm_width)
    eos = read_checkpoint(ckpt).eos_token_ids()
    weight_bytes = _lm_bytes_per_token(ckpt)
    streams = [int(s) for s in args.streams.split(",")]

    slots = max(streams)
    with start_decoder(ckpt, ["--max-active", str(slots), "--max-queue", str(args.max_queue)]) as svc:
        asyncio.run(_aggregate(svc.decoder_addr, 2, 8, eos))  # warm-up
        rows = [(c, *asyncio.run(_aggregate(svc.decoder_addr, c, args.tokens, eos))) for c in streams]
        warm_ms, cold_ms, hit = asyncio.run(_turn2(svc.decoder_addr, args.turn1_tokens, eos, 3))
        burst = asyncio.run(_burst(svc.decoder_addr, args.burst, args.tokens, eos, slots)) if args.burst else None
    anchor = {} if args.no_anchor else _anchor(ckpt, streams, args.tokens, eos)
    kv_rows = [] if args.no_kv_bits else _kv_quantization(ckpt, eos)
    base = rows[0][1]
    print(f"\ncheckpoint: {ckpt}  LM weights read per token: {weight_bytes / 1e6:.1f} MB  "
          f"tokens/stream={args.tokens}  BLAS: {blas_in_use()}")
    print(f"{'streams':>7} {'aggregate tok/s':>16} {'per-stream tok/s':>17} {'vs 1 stream':>12} "
          f"{'in-process BatchGenerator':>26} {'services / it':>14}")
    for c, agg, per in rows:
        ref = anchor.get(c)
        extra = f" {ref:>26.1f} {agg / ref:>13.2f}x" if ref else ""
        print(f"{c:>7} {agg:>16.1f} {per:>17.1f} {agg / base:>11.2f}x{extra}")
    if burst is not None:
        print(f"\nburst of {args.burst} x {args.tokens} tokens (--max-active {slots} --max-queue {args.max_queue}): "
              f"{burst['refused']} refused, {burst['other_errors']} other errors, {burst['served']} served; "
              f"all {slots} slots generating after {burst['all_busy_s']:.2f} s; "
              f"{burst['tok_s']:.1f} tok/s over {burst['wall_s']:.1f} s")
    print(f"\nturn-2 TTFT: {warm_ms:.1f} ms with turn 1 cached ({hit} tokens reused) vs {cold_ms:.1f} ms cold "
          f"-> {warm_ms / cold_ms:.2f}x")
    bw = _read_bandwidth()
    hw, threads = _hardware_read_bandwidth()
    single = rows[0][2]
    print(f"single stream: {single:.1f} tok/s; LM weights {weight_bytes / 1e6:.1f} MB a token")
    print(f"{'read bound':>28} {'GB/s':>7} {'bound tok/s':>12} {'single stream':>14}")
    for name, b in ((f"hardware (numpy, {threads} thr)", hw), ("MLX's own reduction", bw)):
        print(f"{name:>28} {b / 1e9:>7.1f} {b / weight_bytes:>12.1f} {single / (b / weight_bytes) * 100:>13.0f}%")
    if kv_rows:
        print("\nprefix cache KV, 6 conversations of ~1,000 tokens, turn 2 (32 greedy tokens) from the cache:")
        print(f"{'--kv-bits':>9} {'KV bytes/token':>15} {'vs full':>8} {'turn 2 same as full':>20} "
              f"{'mean tokens before a difference':>32} {'min cached tokens':>18}")
        for bits, bpt, ratio, same, n, prefix, cached in kv_rows:
            print(f"{bits!s:>9} {bpt:>15.1f} {ratio:>7.2f}x {f'{same}/{n}':>20} {prefix:>32.1f} {cached:>18}")


if __name__ == "__main__":
    main()

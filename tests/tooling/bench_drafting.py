"""``python -m tests.tooling.bench_drafting``: MTP drafting on the demo model, with and without.

Prints tables (never asserts):

1. decode tokens/s of the decoder service (its own OS process on loopback, over gRPC) with and
   without the demo model's drafter (``deploy/demo/tiny-gemma4-demo-drafter``) at 1, 4 and 8
   streams — per-request decode rate (median; tokens after the first ÷ decode time) and the
   aggregate over the run's wall time — with tokens per target forward and the ratio;
2. acceptance by draft position (the decoder's Prometheus counters);
3. the anchor in this process, on the same BLAS, prompts and drafter: mlx-vlm's own speculative
   decoding — ``generate_step(draft_model=…)`` alone, and its ``BatchGenerator`` with the drafter
   at 8 streams arriving staggered (a new prompt as soon as one finishes: it cannot take new rows
   into a running speculative batch, so they wait for it to drain);
4. ``--kv-bits 8 / 4`` on the running batch (in this process, mlx-lm's ``BatchGenerator`` with the
   decoder's quantized row caches, on a generated 31B-shaped checkpoint — the demo model is E2B-shaped,
   whose only full-attention layer other layers read, so nothing of it is quantized): KV bytes a token
   of the running batch, the longest conversation a fixed KV budget holds, and greedy agreement with
   full precision (tokens before the first difference).

Workload: the demo model's own questions in held-out phrasings — text (its fixed answers, 12-45
tokens) by default; every request runs to its natural end-of-turn, as a client's would.
``--streams`` and ``--requests`` size it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np


def _prompts(ckpt: Path, n: int, seed: int) -> list[list[int]]:
    """``n`` demo text questions (held-out seeds), rendered by the checkpoint's chat template."""
    from transformers import AutoTokenizer

    from deploy.demo import tasks

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    rng = np.random.default_rng(tasks.HELD_OUT_SEED + seed)
    out = []
    for _ in range(n):
        ex = tasks.make_example("text", rng)
        text = " ".join(v for k, v in ex.parts if k == "text")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


async def _one(client, ids: list[int], max_tokens: int):
    from mmserve_core.client import TokenEvent

    toks, done = 0, None
    async for ev in client.generate(ids, temperature=0.0, max_tokens=max_tokens):
        if isinstance(ev, TokenEvent):
            toks += len(ev.token_ids)
        else:
            done = ev
    return done


async def _streams(addr: str, prompts: list[list[int]], streams: int, max_tokens: int) -> dict:
    """``streams`` closed-loop workers share ``prompts`` (each takes the next when its last ends)."""
    from mmserve_core.client import AsyncDecoderClient

    client = AsyncDecoderClient(addr)
    queue = list(prompts)
    done = []

    async def worker(k: int):
        await asyncio.sleep(0.01 * k)  # staggered arrivals
        while queue:
            done.append(await _one(client, queue.pop(), max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(c.completion_tokens for c in done)
    accepted = sum(c.draft_accepted_tokens for c in done)
    return {"aggregate": tokens / wall,
            "per_request": statistics.median((c.completion_tokens - 1) / (c.decode_ms / 1000) for c in done
                                             if c.completion_tokens > 1 and c.decode_ms > 0),
            "per_forward": tokens / max(1, tokens - accepted), "drafted": sum(c.draft_tokens for c in done),
            "accepted": accepted, "tokens": tokens}


def _metrics(logs: str) -> dict[str, dict[str, float]]:
    url = re.search(r"metrics listening\s+address=(\S+)", logs).group(1)
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, dict[str, float]] = {"drafted": {}, "accepted": {}}
    for name, key in (("mmserve_decoder_draft_position_tokens_total", "drafted"),
                      ("mmserve_decoder_draft_position_accepted_tokens_total", "accepted")):
        for pos, v in re.findall(rf'^{name}{{position="(\d+)"}} ([0-9.e+-]+)$', text, re.M):
            out[key][pos] = float(v)
    return out


def _service_runs(ckpt: Path, drafter: Path | None, prompts, streams: list[int], max_tokens: int):
    from deploy.processes import start_decoder

    args = ["--metrics-port", "0", "--max-active", str(max(streams))]
    if drafter is not None:
        args += ["--draft-model", str(drafter)]
    with start_decoder(ckpt, args) as svc:
        asyncio.run(_streams(svc.decoder_addr, prompts[:4], 2, max_tokens))  # warm-up
        rows = {c: asyncio.run(_streams(svc.decoder_addr, prompts, c, max_tokens)) for c in streams}
        positions = _metrics(svc.logs("decoder")) if drafter is not None else None
    return rows, positions


def _anchor(ckpt: Path, drafter_dir: Path, prompts, max_tokens: int, streams: int) -> dict:
    """mlx-vlm in this process: its speculative ``generate_step`` alone, and its ``BatchGenerator``
    with the drafter at ``streams`` staggered streams; each also without the drafter."""
    import mlx.core as mx
    from mlx_vlm import load
    from mlx_vlm.generate.ar import BatchGenerator, generate_step
    from mlx_vlm.speculative.drafters import load_drafter

    from mmserve_core.runtime.checkpoint import read_checkpoint

    model, processor = load(str(ckpt))
    drafter, kind = load_drafter(str(drafter_dir))
    eos = set(read_checkpoint(ckpt).eos_token_ids())
    out = {}
    for name, dm in (("off", None), ("on", drafter)):
        rates, total, t0 = [], 0, time.perf_counter()
        for ids in prompts:
            kw = {"draft_model": dm, "draft_kind": kind} if dm is not None else {}
            times = []
            for tok, _ in generate_step(mx.array([ids]), model, None, None, max_tokens=max_tokens, **kw):
                times.append(time.perf_counter())
                if int(tok) in eos:
                    break
            total += len(times)
            if len(times) > 1:
                rates.append((len(times) - 1) / (times[-1] - times[0]))
        out[("1", name)] = (statistics.median(rates), total / (time.perf_counter() - t0))
        kw = {"draft_model": dm, "draft_kind": kind} if dm is not None else {}
        bg = BatchGenerator(model.language_model, processor, stop_tokens=eos, max_tokens=max_tokens,
                            completion_batch_size=streams, prefill_batch_size=streams, compute_logprobs=False,
                            **kw)

        def insert(ids, bg=bg):  # as mlx_vlm.batch_generate inserts a prompt: with its input embeddings
            emb = model.get_input_embeddings(mx.array([ids]), None).to_dict()
            bg.insert([ids], prompt_kwargs=[{k: v for k, v in emb.items() if v is not None}])

        queue = list(prompts)
        for _ in range(min(streams, len(queue))):
            insert(queue.pop())
        total, live, t0 = 0, min(streams, len(prompts)), time.perf_counter()
        while live:
            _, responses = bg.next()
            for r in responses:
                total += 1
                if r.finish_reason is not None:
                    live -= 1
                    if queue:  # the next client arrives as one finishes
                        insert(queue.pop())
                        live += 1
        out[(str(streams), name)] = (float("nan"), total / (time.perf_counter() - t0))
        bg.close()
        mx.clear_cache()
    return out


def _state_bytes(c) -> int:
    """Bytes of the positions a cache holds (its ``state``), not of its step-sized buffers."""
    from mlx.utils import tree_flatten

    return sum(a.nbytes for _, a in tree_flatten(list(c.state[:2])) if hasattr(a, "nbytes"))


def _running_kv(prompt_len: int, rows: int, tokens: int, budget: int) -> list[tuple]:
    """Section 4: (bits, full-attention KV bytes/token, sliding bytes (fixed), tokens in ``budget``,
    agreement per row) for full precision, 8 and 4 bits."""
    import tempfile

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from decoder_service.model import LanguageModelRunner
    from decoder_service.quantized_kv import quantizable_layers, quantize
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="mmserve-kv-")) / "dense", variant="dense",
                                 dtype="bfloat16", overrides={"text_config": {
                                     "head_dim": 64, "global_head_dim": 128, "num_global_key_value_heads": 2,
                                     "num_key_value_heads": 2, "num_attention_heads": 4,
                                     "max_position_embeddings": 1 << 16}})
    runner = LanguageModelRunner(ckpt)
    layers = quantizable_layers(runner.lm, drafter=False)
    fwd = runner.logits_model()
    rng = np.random.default_rng(0)
    prompts = [[2, 105, *map(int, rng.integers(10, 240, prompt_len))] for _ in range(rows)]
    out, ref = [], None
    for bits in (None, 8, 4):
        bg = BatchGenerator(fwd, completion_batch_size=rows, prefill_batch_size=rows)
        caches, firsts = [], []
        for p in prompts:
            c, logits = runner.prefill(p, [])
            caches.append(quantize(c, layers, bits) if bits else c)
            firsts.append(int(mx.argmax(logits, -1).item()))
        uids = bg.insert([[f] for f in firsts], max_tokens=[tokens] * rows, caches=caches,
                         all_tokens=[list(p) for p in prompts])
        got = {u: [] for u in uids}
        full = sliding = None
        while any(len(v) < tokens for v in got.values()):
            _, resp = bg.next()
            for r in resp:
                got[r.uid].append(int(r.token))
            batch = getattr(bg, "_generation_batch", None)
            if full is None and batch is not None and resp:  # the running batch's caches, read once
                n = sum(len(p) for p in prompts)
                kinds = [type(c).__name__ for c in batch.prompt_cache]
                full = sum(_state_bytes(c) for c, k in zip(batch.prompt_cache, kinds) if "Rotating" not in k) / n
                sliding = sum(_state_bytes(c) for c, k in zip(batch.prompt_cache, kinds) if "Rotating" in k)
        seqs = [got[u] for u in uids]
        ref = ref or seqs
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(seqs, ref)]
        out.append((bits or "full", full, sliding, int((budget - sliding / rows) / full), agree))
        bg.close()
        mx.clear_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    from deploy.demo.checkpoint_path import CHECKPOINT_DIR, DRAFTER_DIR

    ap = argparse.ArgumentParser(prog="python -m tests.tooling.bench_drafting", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    ap.add_argument("--drafter", default=str(DRAFTER_DIR))
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--requests", type=int, default=48, help="requests per stream count")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--kv-prompt", type=int, default=1500, help="section 4: prompt tokens per row")
    args = ap.parse_args(argv)

    from mmserve_core.runtime.blas import blas_in_use, preload_optimized_blas

    preload_optimized_blas()
    ckpt, drafter = Path(args.checkpoint), Path(args.drafter)
    streams = [int(s) for s in args.streams.split(",")]
    prompts = _prompts(ckpt, args.requests, 1)
    off, _ = _service_runs(ckpt, None, prompts, streams, args.max_tokens)
    on, positions = _service_runs(ckpt, drafter, prompts, streams, args.max_tokens)
    print(f"\ncheckpoint: {ckpt.name}  drafter: {drafter.name}  requests/row: {len(prompts)}  BLAS: {blas_in_use()}")
    print(f"{'streams':>7} {'per-request tok/s off':>22} {'on':>8} {'ratio':>7} {'aggregate tok/s off':>20} "
          f"{'on':>8} {'ratio':>7} {'tokens/forward':>15} {'accepted/drafted':>17}")
    for c in streams:
        a, b = off[c], on[c]
        print(f"{c:>7} {a['per_request']:>22.1f} {b['per_request']:>8.1f} {b['per_request'] / a['per_request']:>6.2f}x"
              f" {a['aggregate']:>20.1f} {b['aggregate']:>8.1f} {b['aggregate'] / a['aggregate']:>6.2f}x"
              f" {b['per_forward']:>15.2f} {b['accepted']:>8}/{b['drafted']:<8}")
    print("\nacceptance by draft position (all runs with the drafter)")
    for pos in sorted(positions["drafted"], key=int):
        d, acc = positions["drafted"][pos], positions["accepted"].get(pos, 0.0)
        print(f"  position {pos}: {acc:.0f} / {d:.0f} = {acc / d:.2f}" if d else f"  position {pos}: none")
    kv = _running_kv(args.kv_prompt, 4, 48, 64 << 20)
    print("\n--kv-bits on the running batch (31B-shaped bf16 checkpoint, 4 rows of "
          f"{args.kv_prompt} prompt tokens, 48 greedy tokens each)")
    print(f"{'kv':>5} {'full-attn KV bytes/token':>25} {'vs full':>8} {'sliding KV (fixed)':>19} "
          f"{'tokens in 64 MiB':>17} {'greedy tokens before 1st difference':>36}")
    for bits, full, sliding, fit, agree in kv:
        print(f"{bits!s:>5} {full:>25.0f} {full / kv[0][1]:>7.2f}x {sliding:>19.0f} {fit:>17} {agree!s:>36}")
    if args.no_anchor:
        return
    anchor = _anchor(ckpt, drafter, prompts, args.max_tokens, max(streams))
    print("\nanchor: mlx-vlm's own speculative decoding in this process (same prompts, drafter, BLAS)")
    print(f"{'streams':>7} {'mlx-vlm per-request off':>24} {'on':>8} {'aggregate off':>14} {'on':>8} "
          f"{'services (on) / mlx-vlm (on)':>29}")
    for c in ("1", str(max(streams))):
        (po, ao), (pn, an) = anchor[(c, "off")], anchor[(c, "on")]
        ours = on[int(c)]
        ratio = ours["per_request"] / pn if c == "1" else ours["aggregate"] / an
        print(f"{c:>7} {po:>24.1f} {pn:>8.1f} {ao:>14.1f} {an:>8.1f} {ratio:>28.2f}x")


if __name__ == "__main__":
    main()

"""``python -m tests.tooling.demo_training.drafter``: distil an MTP drafter for the demo checkpoint.

What it does: loads the trained demo model (frozen), runs it over generated task sequences (the
same ``tasks`` and ``Batcher`` as the demo's own training: pictures, clips, both, videos, text),
and trains a Gemma 4 assistant drafter (``gemma4_assistant``, mlx-vlm's
``Gemma4AssistantDraftModel``) on what the model itself computes there: its last hidden state
(final norm applied, as ``LanguageModel.speculative_draft_hidden`` gives it), the K/V of its last
sliding and full-attention layers, and its own greedy next tokens as labels — distillation, so the
drafter learns to predict *this* model, not the data.

Each position ``i`` of a reply trains every draft depth ``d = 1..D`` the way ``draft_block`` runs
at serving time: depth 1 reads ``[embed(y_i), h_i]`` (the model's token at ``i`` and its hidden
there) and predicts ``y_{i+1}``; depth ``d`` reads ``[embed(y_{i+d-1}), drafter hidden of depth
d-1]`` and predicts ``y_{i+d}`` — queries held at position ``i``, attending the target's K/V at
``<= i`` (within the sliding window on the sliding layer), all positions of a batch at once.
Positions where the sequence departs from the model's own greedy tokens are left out.

Writes ``OUT/config.json`` + ``model.safetensors`` (``load_drafter`` loads it) and ``card.json``
(recipe, loss, held-out acceptance by draft position on the training objective).

Thread ownership: the main thread does all MLX work; one producer thread makes batches.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from deploy.demo import tasks
from deploy.demo.checkpoint_path import CHECKPOINT_DIR, DRAFTER_DIR
from mmserve_core.runtime.blas import preload_optimized_blas

TASK_CYCLE = ("text", "image", "audio", "both", "video", "image", "audio", "text", "misplaced")


def _masks(T: int, window: int):
    """Additive masks [1, 1, T, T] per layer type: query i sees keys j <= i (and i - j < window)."""
    import mlx.core as mx

    i = mx.arange(T)[:, None]
    j = mx.arange(T)[None, :]
    full = j <= i
    sliding = full & (i - j < window)
    neg = mx.array(-mx.inf, dtype=mx.float32)
    zero = mx.array(0.0, dtype=mx.float32)
    return {"full_attention": mx.where(full, zero, neg)[None, None],
            "sliding_attention": mx.where(sliding, zero, neg)[None, None]}


def _targets(target, b: dict):
    """The frozen model's hidden (normed), shared K/V and greedy tokens over a batch."""
    import mlx.core as mx

    kw = {k: b[k] for k in ("pixel_values", "input_features", "input_features_mask", "pixel_values_videos",
                             "video_position_ids") if k in b}
    out = target(b["ids"], return_hidden=True, return_shared_kv=True, **kw)
    lm = target.language_model
    hidden = lm.speculative_draft_hidden(out.hidden_states[-1])
    y = out.logits.argmax(-1)
    shared = {k: (mx.stop_gradient(kv[0]), mx.stop_gradient(kv[1])) for k, kv in out.shared_kv_states.items()}
    return mx.stop_gradient(hidden), shared, y


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    """``a[:, i + k]`` at ``i`` (zeros past the end)."""
    out = np.zeros_like(a)
    out[:, : a.shape[1] - k] = a[:, k:]
    return out


def _weights(ids: np.ndarray, y: np.ndarray, weight: np.ndarray, depth: int) -> np.ndarray:
    """[D, B, T] loss weights: position i trains depth d when its label y[i+d] predicts a reply
    token and the sequence's tokens i+1 .. i+d are the model's own greedy picks."""
    B, T = ids.shape
    reply = np.zeros((B, T), np.float32)
    reply[:, : T - 1] = weight  # y[i] predicts a reply token
    follows = np.zeros((B, T), np.float32)
    follows[:, : T - 1] = ids[:, 1:] == y[:, : T - 1]  # token i+1 is the model's pick at i
    out = np.zeros((depth, B, T), np.float32)
    for d in range(1, depth + 1):
        ok = reply * _shift(reply, d)
        for e in range(d):
            ok = ok * _shift(follows, e)
        out[d - 1] = ok
    return out


def drafter_forward(drafter, lm, hidden, shared, y, masks, depth: int):
    """Logits [D, B, T, V] of every depth, teacher-forced on the model's own tokens ``y``."""
    import mlx.core as mx

    B, T = y.shape
    embed = lm.model.embed_tokens
    scale = lm.model.embed_scale
    h_prev = hidden
    out = []
    for d in range(1, depth + 1):
        tok = mx.concatenate([y[:, d - 1:], mx.zeros((B, d - 1), y.dtype)], axis=1)
        x = mx.concatenate([mx.stop_gradient(embed(tok) * scale), h_prev], axis=-1)
        h = drafter.pre_projection(x)
        for layer in drafter.model.layers:
            h, _, _ = layer(h, mask=masks[layer.layer_type].astype(h.dtype), cache=None, per_layer_input=None,
                            shared_kv=shared[layer.layer_type], offset=mx.array(0))
        h = drafter.model.norm(h)
        h_prev = drafter.post_projection(h)
        out.append(drafter.model.embed_tokens.as_linear(h))  # tied, as bind() would set it
    return out


def train(args: argparse.Namespace) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_vlm import load
    from mlx_vlm.speculative.drafters.gemma4_assistant import Gemma4AssistantDraftModel
    from mlx_vlm.speculative.drafters.gemma4_assistant.config import Gemma4AssistantConfig

    from tests.tooling.demo_training.train import Batcher
    from tests.tooling.tiny_checkpoint import drafter_config

    mx.random.seed(args.seed)
    ckpt = Path(args.target)
    target, processor = load(str(ckpt))
    config = json.loads((ckpt / "config.json").read_text())
    dcfg = drafter_config(config, hidden_size=args.hidden, layers=args.layers, block_size=args.block_size)
    drafter = Gemma4AssistantDraftModel(Gemma4AssistantConfig.from_dict(dcfg))
    # not bound: bind() makes the target's embedding a child of the drafter (it would train and be saved)
    lm = target.language_model
    window = int(config["text_config"]["sliding_window"])
    batcher = Batcher(processor, config)
    depth = args.block_size - 1
    n_params = sum(v.size for _, v in tree_flatten(drafter.parameters()))

    def loss_fn(dr, hidden, shared, y, masks, w):
        logits = drafter_forward(dr, lm, hidden, shared, y, masks, depth)
        total, parts = mx.array(0.0), []
        for d in range(depth):
            labels = mx.concatenate([y[:, d + 1:], mx.zeros((y.shape[0], d + 1), y.dtype)], axis=1)
            ce = nn.losses.cross_entropy(logits[d].astype(mx.float32), labels)
            wd = w[d]
            total = total + (ce * wd).sum() / mx.maximum(wd.sum(), 1.0)
            parts.append(((logits[d].argmax(-1) == labels) * wd).sum() / mx.maximum(wd.sum(), 1.0))
        return total, parts

    value_and_grad = nn.value_and_grad(drafter, lambda dr, *a: loss_fn(dr, *a)[0])
    warm = max(1, min(50, args.steps // 10))
    opt = optim.AdamW(learning_rate=optim.join_schedules(
        [optim.linear_schedule(1e-6, args.lr, warm), optim.cosine_decay(args.lr, args.steps - warm, args.lr * 0.05)],
        [warm]), weight_decay=0.0)

    batches: queue.Queue = queue.Queue(maxsize=6)

    def produce(seed: int, n: int | None, out: queue.Queue) -> None:
        rng = np.random.default_rng(seed)
        i = 0
        while n is None or i < n:
            task = TASK_CYCLE[i % len(TASK_CYCLE)]
            i += 1
            out.put((task, batcher.make([tasks.make_example(task, rng) for _ in range(args.batch_size)])))

    threading.Thread(target=produce, args=(args.seed, None, batches), daemon=True, name="drafter-batches").start()

    def prepare(b: dict):
        mb = {k: mx.array(v) for k, v in b.items() if k != "weight"}
        hidden, shared, y = _targets(target, mb)
        mx.eval(hidden, shared, y)
        w = _weights(b["ids"], np.array(y), b["weight"], depth)
        return hidden, shared, y, _masks(b["ids"].shape[1], window), mx.array(w)

    t0 = time.perf_counter()
    log = []
    for step in range(1, args.steps + 1):
        task, b = batches.get()
        inputs = prepare(b)
        loss, grads = value_and_grad(drafter, *inputs)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(drafter, grads)
        mx.eval(drafter.parameters(), opt.state, loss)
        if step % 50 == 0:
            rec = {"step": step, "task": task, "loss": round(loss.item(), 4),
                   "min": round((time.perf_counter() - t0) / 60, 2)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    minutes = (time.perf_counter() - t0) / 60

    # held out: per-depth accuracy of the teacher-forced chain, by task (seeds never used above)
    held: dict[str, list[float]] = {}
    for k, task in enumerate(dict.fromkeys(TASK_CYCLE)):
        rng = np.random.default_rng(1_000_000 + k)
        b = batcher.make([tasks.make_example(task, rng) for _ in range(args.batch_size)])
        _, parts = loss_fn(drafter, *prepare(b))
        held[task] = [round(p.item(), 3) for p in parts]

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(dcfg, indent=2))
    weights = {k: v.astype(getattr(mx, args.dtype)) for k, v in tree_flatten(drafter.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    card = {"made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "target": str(ckpt.name),
            "args": vars(args), "parameters": int(n_params), "train_minutes": round(minutes, 1),
            "log": log, "held_out_depth_accuracy": held}
    (out / "card.json").write_text(json.dumps(card, indent=1))
    return card


def main(argv: list[str] | None = None) -> None:
    preload_optimized_blas()
    ap = argparse.ArgumentParser(prog="python -m tests.tooling.demo_training.drafter", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(DRAFTER_DIR), help="where to write the drafter")
    ap.add_argument("--target", default=str(CHECKPOINT_DIR), help="the trained demo checkpoint it drafts for")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1, help="kv-shared-only layers (alternating sliding, full)")
    ap.add_argument("--block-size", type=int, default=4, help="1 + the draft depth trained and served")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    if not tasks.have_espeak():
        raise SystemExit("needs espeak-ng for the spoken digits")
    card = train(args)
    print(json.dumps(card["held_out_depth_accuracy"]))


if __name__ == "__main__":
    main()

"""``mmserve-train-demo``: train the built-in demo checkpoint from scratch on generated data.

What it does: writes a small float32 Gemma 4 checkpoint on the real mlx-vlm
``gemma4`` schema (vision tower, audio tower, both projectors, an E2B-style
language model with per-layer inputs and KV sharing), loads it with
``mlx_vlm.load`` and trains every part with MLX on the CPU on the closed tasks
of ``tasks.py``.  The forward pass is mlx-vlm's own ``Model.__call__``
(towers -> projectors -> ``masked_scatter`` -> language model); sequences are
rendered by the gateway's own prompt builder.  Loss is on the reply and its
``<turn|>`` only.  During training, small classification heads on the
mean-pooled projector outputs (colour, shape, digit; a video's direction from its last sampled frame's
pooled features minus its first's) speed up the towers; they exist only here and are not saved.

Videos: the colour, shape and spoken digit of a clip were learned within 50 fine-tuning steps, but its
direction stayed at chance (measured: 2 of 12 held-out clips right after 50 steps of video alone) — the
projector's pooled features need not say where a shape is.  The motion head makes them say it, linearly
(first frame vs last), which the language model can then read by averaging over each frame's block.

Why the recipe (see ``tiny-gemma4-demo/CARD.md`` for the numbers): the towers get
auxiliary heads because they learn faster with a direct signal; shapes are on
light backgrounds (``tasks.shape_image`` says why — a wider or deeper vision
tower did not help, measured); the audio tower collapses at learning rates
>= 2e-3 (first probe), so 1e-3; clip bounds of the clipped linears are wide
(calibration constants in real checkpoints, not trained).

Thread ownership: the main thread does all MLX work; one producer thread
makes batches (numpy, PIL, espeak-ng subprocesses) into a bounded queue.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from deploy.demo import tasks
from deploy.demo.checkpoint_path import CHECKPOINT_DIR
from mmserve_core.runtime.blas import preload_optimized_blas

IMAGE_SOFT_TOKENS = 16  # 192 x 192 pixels, 12 x 12 patches pooled 3 x 3
AUDIO_ROWS = 25  # 1.0 s at 40 ms per token
VIDEO_SAMPLED_FRAMES = 4  # a demo clip (2 s at 8 fps) is sampled to 4 frames

# Sizes on top of tests.tooling.tiny_checkpoint's e2b variant (same schema, names and tokens).
DEMO_OVERRIDES: dict = {
    "hidden_size": 128,
    "text_config": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 64,
                    "hidden_size_per_layer_input": 16, "sliding_window": 128},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 32,
                      "position_embedding_size": 64},
    "audio_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "subsampling_conv_channels": [16, 8], "output_proj_dims": 64},
}
TASK_CYCLE = ("image", "audio", "both", "misplaced", "audio", "text")


def write_init(out: Path, seed: int) -> Path:
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(out, variant="e2b", seed=seed, dtype="float32",
                                 image_soft_tokens=IMAGE_SOFT_TOKENS, overrides=DEMO_OVERRIDES, clip_bound=1000.0)


class Batcher:
    """Examples -> padded id/target arrays and tower inputs, preprocessed as the encoder service does."""

    def __init__(self, processor, config: dict) -> None:
        from tests.tooling.demo_training.sequences import Sequencer

        self.image_processor = processor.image_processor
        self.feature_extractor = processor.feature_extractor
        self.video_processor = processor.video_processor
        self.seq = Sequencer(processor.tokenizer, config, IMAGE_SOFT_TOKENS, AUDIO_ROWS)

    def video(self, data: bytes):
        """An MP4's frames and track exactly as the encoder service decodes and preprocesses them."""
        from encoder_service.video import VideoLimits, VideoSampling, decode_video
        from tests.tooling.demo_training.sequences import VideoInputs

        v = decode_video(data, what="video", sampling=VideoSampling(), limits=VideoLimits(600, 10**8, 60),
                         target_rate=tasks.SAMPLE_RATE, audio_track=True, max_audio_seconds=600)
        d = self.video_processor([np.transpose(v.frames, (0, 3, 1, 2))])
        pixels, positions = np.asarray(d["pixel_values_videos"]), np.asarray(d["video_position_ids"])
        return VideoInputs(pixels.reshape(-1, *pixels.shape[-2:]).astype(np.float32),
                           positions.reshape(-1, *positions.shape[-2:]), int(d["num_soft_tokens_per_frame"][0]),
                           v.timestamps, v.audio.waveform)

    def make(self, examples: list[tasks.Example]) -> dict[str, np.ndarray]:
        examples = [dataclasses.replace(ex, parts=[(k, self.video(v) if k == "video" else v) for k, v in ex.parts])
                    for ex in examples]
        seqs = [self.seq.sequence(ex) for ex in examples]
        width = max(len(s.prompt) + len(s.answer) for s in seqs)
        ids = np.zeros((len(seqs), width), np.int32)
        weight = np.zeros((len(seqs), width - 1), np.float32)  # on positions predicting the reply
        for i, s in enumerate(seqs):
            full = s.prompt + s.answer
            ids[i, : len(full)] = full
            weight[i, len(s.prompt) - 1: len(full) - 1] = 1.0
        images, clips, colour, shape, digit, videos = [], [], [], [], [], []
        for ex in examples:  # row-major order of appearance = masked_scatter's order
            for kind, value in ex.parts:
                if kind == "image":
                    images.append(value)
                elif kind == "audio":
                    clips.append(np.round(np.clip(value, -1, 1) * 32767) / 32768.0)  # as a 16-bit WAV decodes
                elif kind == "video":  # its frames, then its track (an audio block right after them)
                    videos.append(value)
                    clips.append(value.track)
            words = (ex.media_answer or ex.answer).replace(",", "").split()
            order = [k for k, _ in ex.parts if k != "text"]
            labels = dict(zip(order, _split_answer(words, order))) if "video" not in order else {}
            if "image" in labels:
                c, s = labels["image"]
                colour.append(list(tasks.COLORS).index(c))
                shape.append(tasks.SHAPES.index(s))
            if "audio" in labels:
                digit.append(tasks.DIGITS.index(labels["audio"][0]))
        out = {"ids": ids, "weight": weight}
        if images:
            out["pixel_values"] = np.asarray(self.image_processor(images)[0]["pixel_values"], np.float32)
            out["colour"], out["shape"] = np.array(colour, np.int32), np.array(shape, np.int32)
        if clips:
            fe = self.feature_extractor([c.astype(np.float32) for c in clips], sampling_rate=tasks.SAMPLE_RATE,
                                        return_attention_mask=True)
            out["input_features"] = np.stack(fe["input_features"]).astype(np.float32)
            out["input_features_mask"] = np.stack(fe["input_features_mask"])
            if len(digit) == len(clips):  # a video's track has no digit head label (the digit is anywhere in it)
                out["digit"] = np.array(digit, np.int32)
        if videos:
            out["pixel_values_videos"] = np.concatenate([v.pixels for v in videos])
            out["video_position_ids"] = np.concatenate([v.positions for v in videos])
            if len(videos) == len(examples):  # a video batch: each clip's direction, for the motion head
                out["direction"] = np.array([tasks.DIRECTIONS.index(ex.answer.split(",")[0].split()[-1])
                                             for ex in examples], np.int32)
        return out


def _split_answer(words: list[str], order: list[str]) -> list[list[str]]:
    out, k = [], 0
    for kind in order:
        n = 2 if kind == "image" else 1
        out.append(words[k: k + n])
        k += n
    return out


def _capture(module) -> list:
    """Record ``module``'s outputs (same graph, so gradients flow) without renaming its parameters."""
    seen: list = []
    base = type(module)

    def call(self, *a, **kw):
        y = base.__call__(self, *a, **kw)
        seen.append(y)
        return y

    module.__class__ = type(f"Captured{base.__name__}", (base,), {"__call__": call})
    return seen


def train(args: argparse.Namespace) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_vlm import load

    out = Path(args.out)
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    init = write_init(work / "init", args.seed)
    config = json.loads((init / "config.json").read_text())
    mx.random.seed(args.seed)
    model, processor = load(str(init))
    if args.init_from:  # fine-tune: start from a trained checkpoint's weights (same shapes), in float32
        from mlx.utils import tree_map

        model.load_weights(list(mx.load(str(Path(args.init_from) / "model.safetensors")).items()))
        model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    for _, m in model.named_modules():  # clip bounds are constants, not weights to learn
        keys = [k for k in ("input_min", "input_max", "output_min", "output_max") if k in m]
        if keys:
            m.freeze(keys=keys, recurse=False)
    batcher = Batcher(processor, config)

    class Heads(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.colour = nn.Linear(d, len(tasks.COLORS))
            self.shape = nn.Linear(d, len(tasks.SHAPES))
            self.digit = nn.Linear(d, len(tasks.DIGITS))
            self.direction = nn.Linear(d, len(tasks.DIRECTIONS))

    class Trainee(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.heads = Heads(config["text_config"]["hidden_size"])

    trainee = Trainee()
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log = open(work / "log.jsonl", "w")
    t0 = time.perf_counter()
    pretrain_towers(model, trainee.heads, batcher, args, log)
    vision_out, audio_out = _capture(model.embed_vision), _capture(model.embed_audio)

    def loss_fn(t: Trainee, b: dict):
        vision_out.clear()
        audio_out.clear()
        kw = {k: b[k] for k in ("pixel_values", "input_features", "input_features_mask", "pixel_values_videos",
                                 "video_position_ids") if k in b}
        logits = t.model(b["ids"][:, :-1], **kw).logits.astype(mx.float32)
        targets = b["ids"][:, 1:]
        w = b["weight"]
        main = (nn.losses.cross_entropy(logits, targets) * w).sum() / w.sum()
        exact = (((logits.argmax(-1) == targets) | (w == 0)).all(axis=1)).mean()
        aux = mx.array(0.0)
        if vision_out and "colour" in b:
            f = vision_out[0].reshape(b["colour"].shape[0], -1, vision_out[0].shape[-1]).mean(1)
            aux = aux + nn.losses.cross_entropy(t.heads.colour(f), b["colour"]).mean()
            aux = aux + nn.losses.cross_entropy(t.heads.shape(f), b["shape"]).mean()
        if vision_out and "direction" in b:  # motion: the last sampled frame's mean features minus the first's
            f = vision_out[0].reshape(b["direction"].shape[0], VIDEO_SAMPLED_FRAMES, -1, vision_out[0].shape[-1])
            f = f.mean(2)
            aux = aux + nn.losses.cross_entropy(t.heads.direction(f[:, -1] - f[:, 0]), b["direction"]).mean()
        if audio_out and "digit" in b:
            f = audio_out[0][:, :AUDIO_ROWS].mean(1)
            aux = aux + nn.losses.cross_entropy(t.heads.digit(f), b["digit"]).mean()
        return main + args.aux * aux, (main, aux, exact)

    value_and_grad = nn.value_and_grad(trainee, lambda t, b: loss_fn(t, b)[0])
    warm = max(1, min(100, args.steps // 10))
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-6, args.lr, warm), optim.cosine_decay(args.lr, args.steps - warm, args.lr * 0.05)],
        [warm])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.0)

    batches: queue.Queue = queue.Queue(maxsize=6)
    cycle = args.tasks.split(",")

    def produce() -> None:  # numpy / PIL / espeak-ng only: MLX arrays are made on the main thread
        rng = np.random.default_rng(args.seed)
        i = 0
        while True:
            task = cycle[i % len(cycle)]
            i += 1
            batches.put((task, batcher.make([tasks.make_example(task, rng) for _ in range(args.batch_size)])))

    threading.Thread(target=produce, daemon=True, name="demo-batches").start()
    recent: dict[str, list] = {}
    for step in range(1, args.steps + 1):
        task, b = batches.get()
        b = {k: mx.array(v) for k, v in b.items()}
        (loss, grads) = value_and_grad(trainee, b)
        grads, gnorm = optim.clip_grad_norm(grads, 1.0)
        opt.update(trainee, grads)
        _, (main, aux, exact) = loss_fn(trainee, b) if step % 25 == 0 else (None, (None, None, None))
        mx.eval(trainee.parameters(), opt.state, loss)
        if step % 25 == 0:
            rec = {"step": step, "task": task, "loss": round(loss.item(), 4), "main": round(main.item(), 4),
                   "aux": round(aux.item(), 4), "exact": round(exact.item(), 3), "gnorm": round(gnorm.item(), 3),
                   "min": round((time.perf_counter() - t0) / 60, 2)}
            recent.setdefault(task, []).append(rec["exact"])
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % 100 == 0:
                print(json.dumps(rec), flush=True)
    minutes = (time.perf_counter() - t0) / 60
    save(model, init, out, args.dtype)
    return {"steps": args.steps, "tower_steps": args.tower_steps, "train_minutes": round(minutes, 1),
            "trainable_parameters": int(n_params),
            "train_exact_last": {k: v[-4:] for k, v in recent.items()}}


def pretrain_towers(model, heads, batcher: Batcher, args: argparse.Namespace, log) -> None:
    """Phase 1: each tower + projector + its classification head alone, no language model.

    Measured: the vision tower + head alone learn shape in ~250 steps of 32
    images, while inside the joint loss (gradients clipped together with the
    language model's) shape stayed at chance for 400+ steps.  Cheap (no LM
    forward), so the joint phase starts from towers that already separate the
    classes.  Main thread; its own producer thread."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    if args.tower_steps <= 0:
        return

    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision, self.embed_vision = model.vision_tower, model.embed_vision
            self.audio, self.embed_audio = model.audio_tower, model.embed_audio
            self.heads = heads

    def loss_fn(t: Towers, b: dict):
        ce = nn.losses.cross_entropy
        if "pixel_values" in b:
            f = t.embed_vision(t.vision(b["pixel_values"]))
            f = f.reshape(b["colour"].shape[0], -1, f.shape[-1]).mean(1)
            return ce(t.heads.colour(f), b["colour"]).mean() + ce(t.heads.shape(f), b["shape"]).mean()
        enc, _ = t.audio(b["input_features"], ~b["input_features_mask"].astype(mx.bool_))
        f = t.embed_audio(enc)[:, :AUDIO_ROWS].mean(1)
        return ce(t.heads.digit(f), b["digit"]).mean()

    towers = Towers()
    value_and_grad = nn.value_and_grad(towers, loss_fn)
    warm = max(1, min(50, args.tower_steps // 5))
    opt = optim.AdamW(learning_rate=optim.join_schedules(
        [optim.linear_schedule(1e-6, args.lr, warm), lambda _: args.lr], [warm]), weight_decay=0.0)
    batches: queue.Queue = queue.Queue(maxsize=6)

    def produce() -> None:
        rng = np.random.default_rng(args.seed + 1)
        for i in range(args.tower_steps):
            task, n = ("image", 32) if i % 2 == 0 else ("audio", 16)
            batches.put((task, batcher.make([tasks.make_example(task, rng) for _ in range(n)])))

    threading.Thread(target=produce, daemon=True, name="demo-tower-batches").start()
    t0 = time.perf_counter()
    for step in range(1, args.tower_steps + 1):
        task, b = batches.get()
        b = {k: mx.array(v) for k, v in b.items() if k not in ("ids", "weight")}
        loss, grads = value_and_grad(towers, b)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(towers, grads)
        mx.eval(towers.parameters(), opt.state, loss)
        if step % 50 in (0, 1) and step > 1:
            rec = {"tower_step": step, "task": task, "aux": round(loss.item(), 4),
                   "min": round((time.perf_counter() - t0) / 60, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)


def save(model, init: Path, out: Path, dtype: str) -> None:
    """The trained weights in ``dtype`` beside the init checkpoint's config, tokenizer and processor files."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in init.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.tooling.demo_training.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(CHECKPOINT_DIR),
                    help="where to write the checkpoint (default: the one shipped in the package)")
    ap.add_argument("--tower-steps", type=int, default=600, help="phase 1: towers + heads alone")
    ap.add_argument("--steps", type=int, default=2700, help="phase 2: everything together")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the tower classification heads")
    ap.add_argument("--tasks", default=",".join(TASK_CYCLE), help="batch task cycle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--eval-n", type=int, default=100, help="held-out items per task, through the services")
    ap.add_argument("--init-from", default=None,
                    help="start from this trained checkpoint's weights (fine-tune; use --tower-steps 0)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    preload_optimized_blas()  # the wheel's reference BLAS made a step ~3x slower (measured)
    args = parse_args(argv)
    if not tasks.have_espeak():
        sys.exit("mmserve-train-demo needs espeak-ng for the spoken digits (apt-get install espeak-ng / "
                 "brew install espeak-ng)")
    before = None
    if args.init_from and (Path(args.init_from) / "card.json").exists():  # read now: OUT may be that directory
        before = json.loads((Path(args.init_from) / "card.json").read_text())
    t0 = time.perf_counter()
    summary = train(args)
    summary["wall_minutes_train"] = round((time.perf_counter() - t0) / 60, 1)
    from deploy.demo.checkpoint_path import CHECKPOINT_DIR
    from tests.tooling.demo_training.card import write_card
    from tests.tooling.demo_training.evaluate import evaluate_checkpoint

    if Path(args.out).resolve() == CHECKPOINT_DIR:  # the shipped copy: refresh the fallback clips too
        tasks.write_sample_clips(CHECKPOINT_DIR.parent / "samples")
    results = evaluate_checkpoint(args.out, n=args.eval_n)
    write_card(Path(args.out), vars(args), summary, results, before=before)
    print(json.dumps({k: v["accuracy"] for k, v in results.items()}))


if __name__ == "__main__":
    main()

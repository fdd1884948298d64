"""The demo checkpoint's card: how it was made and how well it does (``CARD.md`` + ``card.json``)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from deploy.demo import tasks


def write_card(out: Path, args: dict, summary: dict, results: dict[str, dict], made: str | None = None,
               before: dict | None = None) -> None:
    """``before``: the card of the checkpoint this one was fine-tuned from (``--init-from``), kept whole
    in ``card.json`` and summarised in the text, so the record goes back to the first step."""
    params = {k: v for k, v in args.items() if k not in ("out",)}
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    card = {"made": made or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "args": params, **summary,
            "held_out_accuracy": {k: v["accuracy"] for k, v in results.items()},
            "held_out_n": {k: v["n"] for k, v in results.items()},
            "held_out_errors": {k: v["errors"][:5] for k, v in results.items()},
            "checkpoint_bytes": size, **({"before": before} if before else {})}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v['accuracy']:.3f} | {v['n']} |" for k, v in results.items())
    (out / "CARD.md").write_text(f"""# mmserve demo checkpoint

A tiny Gemma 4 (mlx-vlm `gemma4`, E2B-style: vision tower, audio tower, both projectors, a language model
with per-layer inputs and KV sharing) trained from scratch on generated data, so the built-in demo answers
what it is sent. It knows five closed tasks and nothing else:

- a picture of one coloured shape ({", ".join(tasks.COLORS)} x {", ".join(tasks.SHAPES)}) -> e.g. `red circle`;
- a spoken digit, 1 s at 16 kHz (`zero`..`nine`, espeak-ng voices) -> e.g. `seven`;
- a picture and a clip in one user turn -> both answers in the order given, e.g. `red circle, seven`;
- `hello`, `hi`, `what can you do?`, `who are you?` -> fixed answers; any other text -> `{tasks.REFUSAL}`;
- a 2 s MP4 (H.264 + AAC, {tasks.VIDEO_FRAMES} frames at {tasks.VIDEO_FPS} fps) of one such shape moving
  {"/".join(tasks.DIRECTIONS)} edge to edge, with a spoken digit on the video's own audio track -> e.g.
  `red circle moving left, seven` (the encoder samples 4 frames and extracts the track, as for any video).

## Data recipe
Generated on the fly by `deploy/demo/tasks.py`: shapes 56-128 px anywhere on a 192 x 192
light background (grey 170-255, tinted; dark backgrounds are outside what it knows) with pixel noise, colour
jittered; digits from espeak-ng with {len(tasks.VOICES)} voices x
{len(tasks.VARIANTS)} variants, speed 120-230, pitch 15-85, random offset and gain, white or pink noise at 8-30 dB
SNR; prompts drawn from a few phrasings, text before or after the media, or none; and negatives: one picture or
clip moved outside the user turn (right after BOS, or into the pending model turn) -> `{tasks.NO_MEDIA}`. Sequences are rendered by
the gateway's own prompt builder (media blocks inside the user turn). Training seeds start at {params["seed"]};
evaluation seeds at {tasks.HELD_OUT_SEED} and above, never used in training.

## Training
{_before(before)}`mmserve-train-demo` ({json.dumps(params)}). Phase 1: {summary.get("tower_steps", 0)} steps of the towers and
their projectors alone with classification heads on their pooled outputs (colour + shape; digit), images in
batches of 32, clips of 16. Phase 2: {summary["steps"]} steps of the whole model, batch {params["batch_size"]},
tasks cycled {params["tasks"]}, AdamW with warm-up and cosine decay, loss on the reply and `<turn|>` only, plus
the heads' loss (the heads are not saved). {summary["trainable_parameters"]:,} parameters,
{summary["train_minutes"]} min of training on {card["processor"]} ({card["machine"]}), weights stored as
{params["dtype"]} ({size / 1e6:.1f} MB in this directory).

## Held-out accuracy (exact match, greedy, through gateway -> encoder -> decoder over gRPC, `openai` client)
| task | accuracy | n |
|---|---|---|
{rows}

Reproduce: `mmserve-eval-demo` (add `--n 100`). Retrain: `mmserve-train-demo` (writes this directory).
""")


def _before(before: dict | None) -> str:
    """The runs this checkpoint's weights went through before the last one, oldest first."""
    chain = []
    while before:
        chain.append(before)
        before = before.get("before")
    if not chain:
        return ""
    runs = []
    for i, c in enumerate(reversed(chain)):
        a = c.get("args", {})
        acc = ", ".join(f"{k} {v:.2f}" for k, v in c.get("held_out_accuracy", {}).items())
        how = "trained from scratch" if i == 0 else "fine-tuned from that"
        runs.append(f"{how} ({c.get('made', '?')}: {a.get('tower_steps', 0)} tower steps, {a.get('steps', '?')} "
                    f"joint steps, lr {a.get('lr', '?')}, tasks {a.get('tasks', '?')}, {c.get('train_minutes', '?')} "
                    f"min; held-out {acc})")
    return ("First " + "; then ".join(runs) + " — each card kept in `card.json` under `before` — and last "
            "fine-tuned from those weights: ")


def rewrite_results(out: Path, results: dict[str, dict]) -> None:
    """Re-render the card with new held-out results, keeping how the checkpoint was made."""
    card = json.loads((out / "card.json").read_text())
    summary = {k: card[k] for k in ("steps", "tower_steps", "train_minutes", "trainable_parameters",
                                    "train_exact_last", "wall_minutes_train") if k in card}
    write_card(out, dict(card["args"], out=str(out)), summary, results, made=card["made"], before=card.get("before"))

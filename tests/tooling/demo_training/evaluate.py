"""``mmserve-eval-demo``: held-out accuracy of the demo checkpoint, through the real services.

Starts an encoder, a decoder and a gateway on loopback for the checkpoint (or
uses ``--url``), and sends every item with the ``openai`` client as a chat
request — PNG as an ``image_url`` data URL, WAV as ``input_audio``, MP4 as ``video_url`` — greedy.
Items come from seeds at or above ``tasks.HELD_OUT_SEED``, which training
never draws.  A reply counts only if it equals the expected answer (case and
surrounding space aside).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import time
from pathlib import Path

import numpy as np

from deploy.demo import tasks
from deploy.demo.tasks import content, normalize

TASKS = ("image", "audio", "both", "text", "video")
TASK_SEED_OFFSET = {"image": 0, "audio": 100_000, "both": 200_000, "text": 300_000, "video": 400_000}


def held_out(task: str, n: int, seed: int = tasks.HELD_OUT_SEED) -> list[tasks.Example]:
    rng = np.random.default_rng(seed + TASK_SEED_OFFSET[task])
    return [tasks.make_example(task, rng) for _ in range(n)]


def evaluate_url(base_url: str, n: int = 100, which: tuple[str, ...] = TASKS, workers: int = 4,
                 seed: int = tasks.HELD_OUT_SEED) -> dict[str, dict]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id  # any other name is 404 model_not_found

    def ask(ex: tasks.Example) -> str:
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=96,
                                           messages=[{"role": "user", "content": content(ex.parts)}])
        return r.choices[0].message.content or ""

    results = {}
    for task in which:
        if task in ("audio", "both", "video") and not tasks.have_espeak():
            continue
        items = held_out(task, n, seed)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(ask, items))
        wrong = [(ex.answer, got) for ex, got in zip(items, replies) if normalize(got) != normalize(ex.answer)]
        results[task] = {"accuracy": round(1 - len(wrong) / n, 3), "n": n, "errors": wrong[:8],
                         "seconds_per_item": round((time.perf_counter() - t0) / n, 3)}
    return results


def evaluate_checkpoint(checkpoint: str | Path, n: int = 100, which: tuple[str, ...] = TASKS) -> dict[str, dict]:
    from deploy.processes import start_services

    with start_services(checkpoint) as svc:
        return evaluate_url(svc.base_url, n, which)


def main(argv: list[str] | None = None) -> None:
    from deploy.demo.checkpoint_path import demo_checkpoint

    ap = argparse.ArgumentParser(prog="mmserve-eval-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the shipped demo checkpoint")
    ap.add_argument("--url", help="a running gateway's base URL (…/v1) instead of starting services")
    ap.add_argument("--n", type=int, default=100, help="items per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--update-card", action="store_true",
                    help="rewrite the checkpoint's card with these results (keeps its training record)")
    a = ap.parse_args(argv)
    which = tuple(a.tasks.split(","))
    if a.url:
        res = evaluate_url(a.url, a.n, which)
    else:
        res = evaluate_checkpoint(a.checkpoint or demo_checkpoint(), a.n, which)
    print(f"{'task':<8}{'accuracy':>10}{'n':>6}{'s/item':>9}")
    for task, r in res.items():
        print(f"{task:<8}{r['accuracy']:>10.3f}{r['n']:>6}{r['seconds_per_item']:>9.3f}")
    for task, r in res.items():
        for want, got in r["errors"][:3]:
            print(f"  {task}: wanted {want!r}, got {got!r}")
    print(json.dumps({k: v["accuracy"] for k, v in res.items()}))
    if a.update_card and not a.url:
        from tests.tooling.demo_training.card import rewrite_results

        rewrite_results(Path(a.checkpoint or demo_checkpoint()), res)


if __name__ == "__main__":
    main()

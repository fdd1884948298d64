"""Live: real-world JSON Schemas sent to the services as forced tool calls and as ``response_format``.

``python -m tests.tooling.schema_corpus_live [--n 300]`` writes a random-weight checkpoint carrying
the real E-series chat template, starts the three services on loopback, and sends ``--n`` schemas
from the four JSONSchemaBench categories (``../shared/fixtures/jsonschemabench/``, drawn evenly) in
each mode: as a tool's ``parameters`` with ``tool_choice`` required (odd draws: the tool named), and as
``response_format`` json_schema.  Every reply is judged as a client would: a 200's tool-call arguments
or content parsed as JSON and validated with ``jsonschema`` (``format`` as an annotation); a refusal
must be a 400 whose ``param`` names the request's field (``tools[0]…`` / ``response_format…``).  It
prints, per category and mode: replies that validate, **replies that fail validation (target 0)**,
replies cut by ``max_tokens`` (not judged: an unfinished document), refusals (and any that do not name
the field), and **5xx (target 0)**.

A random model rarely closes a string or an object by itself, so a logit bias favours the tokens that
end things (string delimiters, closing brackets, commas, end of turn) — as a trained model's replies
end; the grammar still decides what is allowed.  Loopback only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
CATEGORIES = ("Github_trivial", "Github_easy", "Github_medium", "Glaiveai2K")


def load(category: str) -> list[tuple[str, dict]]:
    with gzip.open(FIXTURES / "jsonschemabench" / f"{category}.jsonl.gz", "rt") as f:
        return [(d["id"], d["schema"]) for d in map(json.loads, f)]


def is_object_schema(s) -> bool:
    return isinstance(s, dict) and (s.get("type") == "object" or ("type" not in s and "properties" in s))


def _validate(schema: dict, value) -> str | None:
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        err = next(iter(cls(schema).iter_errors(value)), None)
    except Exception as e:  # noqa: BLE001 - a schema jsonschema itself cannot judge
        return f"unjudged: {type(e).__name__}"
    return None if err is None else f"{'/'.join(map(str, err.absolute_path))}: {err.message[:160]}"


def _bias(tokenizer) -> dict[str, float]:
    ends = ['<|"|>', "<turn|>", "<tool_call|>"]
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ends}
    for ch in '"}],':
        ids.update(tokenizer.encode(ch, add_special_tokens=False))
    return {str(i): 4.0 for i in ids if i is not None}


def judge(client, mode: str, i: int, schema: dict, bias: dict, max_tokens: int) -> tuple[str, str]:
    """``(outcome, detail)``: ok | invalid | length | refused | refused-unnamed | 5xx | other."""
    body: dict = {"model": "m", "messages": [{"role": "user", "content": "Fill it in."}], "max_tokens": max_tokens,
                  "temperature": 1.0, "seed": i, "logit_bias": bias}
    if mode == "tool":
        body["tools"] = [{"type": "function", "function": {"name": "fill", "description": "Fill in the form.",
                                                           "parameters": schema}}]
        body["tool_choice"] = {"type": "function", "function": {"name": "fill"}} if i % 2 else "required"
        field = "tools[0]"
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        field = "response_format"
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code >= 500:
        return "5xx", r.text[:300]
    if r.status_code == 400:
        param = r.json()["error"].get("param") or ""
        return ("refused" if param.startswith(field) else "refused-unnamed"), r.json()["error"]["message"][:200]
    if r.status_code != 200:
        return "other", f"{r.status_code} {r.text[:200]}"
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "length":
        return "length", ""
    msg = choice["message"]
    try:
        if mode == "tool":
            calls = msg.get("tool_calls") or []
            if not calls:
                return "invalid", "no tool call in a forced reply"
            values = [json.loads(c["function"]["arguments"]) for c in calls]
        else:
            values = [json.loads(msg["content"])]
    except (json.JSONDecodeError, TypeError) as e:
        return "invalid", f"not JSON: {e}"
    for v in values:
        why = _validate(schema, v)
        if why is not None and not why.startswith("unjudged"):
            return "invalid", why
        if why is not None:
            return "unjudged", why
    return "ok", ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="schemas per mode (drawn evenly from the categories)")
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args(argv)
    import httpx
    from transformers import AutoTokenizer

    from deploy.processes import start_services
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    rng = random.Random(a.seed)
    draws: dict[str, list[tuple[str, str, dict]]] = {"tool": [], "response_format": []}
    for cat in CATEGORIES:
        rows = load(cat)
        objects = [r for r in rows if is_object_schema(r[1])]
        k = a.n // len(CATEGORIES)
        draws["tool"] += [(cat, *r) for r in rng.sample(objects, min(k, len(objects)))]
        draws["response_format"] += [(cat, *r) for r in rng.sample(rows, min(k, len(rows)))]
    template = (FIXTURES / "gemma4" / "chat_template.e-series.jinja").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny-e-series", chat_template=template)
        bias = _bias(AutoTokenizer.from_pretrained(ckpt))
        with start_services(ckpt, gateway_args=["--model-alias", "m"]) as svc, \
                httpx.Client(base_url=svc.base_url.removesuffix("/v1"), timeout=300) as client:
            t0 = time.perf_counter()
            results: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
            bad: list[str] = []
            refusals: collections.Counter = collections.Counter()
            for mode, items in draws.items():
                with ThreadPoolExecutor(a.concurrency) as pool:
                    outcomes = list(pool.map(lambda x, m=mode: judge(client, m, x[0], x[1][2], bias, a.max_tokens),
                                             enumerate(items)))
                for (cat, sid, _), (outcome, detail) in zip(items, outcomes):
                    results[(cat, mode)][outcome] += 1
                    if outcome in ("invalid", "5xx", "refused-unnamed", "other"):
                        bad.append(f"{mode} {sid}: {outcome}: {detail}")
                    if outcome.startswith("refused"):
                        refusals[(mode, detail.split(":")[-1].strip()[:90])] += 1
            took = time.perf_counter() - t0
    cols = ("ok", "invalid", "length", "refused", "refused-unnamed", "5xx", "unjudged", "other")
    print(f"\n{'category':<16} {'mode':<16} " + " ".join(f"{c:>9}" for c in cols))
    total: collections.Counter = collections.Counter()
    for (cat, mode), c in sorted(results.items(), key=lambda kv: (kv[0][1], CATEGORIES.index(kv[0][0]))):
        total.update(c)
        print(f"{cat:<16} {mode:<16} " + " ".join(f"{c[x]:>9}" for x in cols))
    print(f"{'all':<16} {'':<16} " + " ".join(f"{total[x]:>9}" for x in cols))
    print(f"\n{sum(total.values())} requests in {took:.0f} s")
    print("\nmost frequent refusals:")
    for (mode, msg), n in refusals.most_common(10):
        print(f"  {n:>4}  {mode:<16} {msg}")
    if bad:
        print("\nfailures:")
        for line in bad[:40]:
            print("  " + line)
    return 1 if total["invalid"] or total["5xx"] or total["refused-unnamed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m tests.tooling.bench_scale_out``: one gateway in front of two decoders — what spreads, what hits.

The scenarios of issue 26, on a tiny checkpoint carrying the real Gemma 4 E-series chat template
(``../shared/fixtures/gemma4``), every process on loopback:

1. **Affinity**: ``--conversations`` conversations sharing one system prompt (~200 tokens) and two
   tools, each with its own question — which decoder served each (the gateway's per-address
   upstream counters, requests one at a time); then each one's turn 2 (its reply sent back, a new
   question): same decoder as turn 1?  cached prompt tokens > 0?
2. **A full replica** (no system prompt, no tools: each request its own conversation): decoder A at ``--max-active 1 --max-queue 0`` busy with one long stream (sent
   through a second gateway that knows only A, so this gateway cannot know A is busy), decoder B
   idle; ``--burst`` short requests at once through the gateway of both: how many 429.
3. **A long generation** under ``--rpc-timeout-s``: does it finish, or is it cut at the deadline?

Prints a table; run it on two commits to compare (it only uses flags every version has).  Not
part of the test suite: the thresholds live in ``tests/e2e/test_scale_out.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import tempfile
import time
from pathlib import Path

import httpx

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gemma4"
SYSTEM = ("You are the support assistant of a small bicycle shop in Utrecht. Answer briefly and politely; "
          "quote prices in euros; when a customer asks about stock, opening hours or repairs, use the tools "
          "below rather than guessing. Never promise a repair date you cannot check. ") * 3
TOOLS = [
    {"type": "function", "function": {"name": "check_stock", "description": "Items in stock for a product",
                                      "parameters": {"type": "object", "properties": {
                                          "product": {"type": "string"}}, "required": ["product"]}}},
    {"type": "function", "function": {"name": "repair_slots", "description": "Free repair slots on a day",
                                      "parameters": {"type": "object", "properties": {
                                          "day": {"type": "string"}}, "required": ["day"]}}},
]
QUESTIONS = ["Do you have a {} in stock?", "Can you fix a {} tomorrow?", "How much is a {}?",
             "Is a {} worth it for commuting?"]
THINGS = ["city bike", "cargo bike", "tandem", "road bike", "folding bike", "e-bike", "child seat", "bell",
          "rear light", "front basket"]
NO_EOS = {"1": -100, "50": -100, "106": -100}  # the tiny checkpoints' EOS ids: replies run to max_tokens


def real_template_checkpoint(root: Path) -> Path:
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(root / "tiny-e2b-real-template",
                                 chat_template=(FIXTURES / "chat_template.e-series.jinja").read_text())


def decoder_calls(url: str) -> dict[str, float]:
    """The gateway's OK Generate calls per decoder address."""
    out: dict[str, float] = {}
    for m in re.finditer(r'mmserve_gateway_upstream_calls_total\{address="([^"]+)",outcome="OK",service="decoder"\} '
                         r'([0-9.e+]+)', httpx.get(url + "/metrics").text):
        out[m.group(1)] = float(m.group(2))
    return out


def _served(url: str, before: dict[str, float]) -> str:
    after = decoder_calls(url)
    moved = [a for a, n in after.items() if n > before.get(a, 0)]
    return moved[0] if len(moved) == 1 else "?"


def conversation(i: int) -> list[dict]:
    q = QUESTIONS[i % len(QUESTIONS)].format(THINGS[i % len(THINGS)]) + f" (customer {i})"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def chat(url: str, messages: list[dict], max_tokens: int = 8, tools: bool = True, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, **({"tools": TOOLS} if tools else {}), "max_tokens": max_tokens, "temperature": 0,
        "logit_bias": NO_EOS, **extra})


def affinity(url: str, n: int) -> dict:
    """Turn 1 of ``n`` conversations, then turn 2 of each: where each went, what turn 2 reused."""
    first, seconds = [], []
    chat(url, [{"role": "user", "content": "warm up"}], 1).raise_for_status()  # GetModelInfo counts as a call
    for i in range(n):
        before = decoder_calls(url)
        r = chat(url, conversation(i))
        r.raise_for_status()
        first.append((_served(url, before), r.json()))
    for i, (_, body) in enumerate(first):
        msg = body["choices"][0]["message"]
        reply = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("tool_calls"):
            reply["tool_calls"] = msg["tool_calls"]
        before = decoder_calls(url)
        turn2 = [*conversation(i), reply, {"role": "user", "content": "Thanks. And on Saturday?"}]
        if msg.get("tool_calls"):
            turn2[-1:-1] = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in msg["tool_calls"]]
        r = chat(url, turn2)
        r.raise_for_status()
        cached = (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        seconds.append((_served(url, before), cached, r.json()["usage"]["prompt_tokens"]))
    homes = [h for h, _ in first]
    share = {a: homes.count(a) for a in sorted(set(homes))}
    return {"turn1_share": share, "turn2_same": sum(h == s for h, (s, _, _) in zip(homes, seconds)),
            "turn2_hits": sum(c > 0 for _, c, _ in seconds), "turn2_cached_mean": sum(c for _, c, _ in seconds) / n,
            "turn2_prompt_mean": sum(p for _, _, p in seconds) / n, "n": n}


def full_replica(url: str, only_a_url: str, burst: int) -> dict:
    """A long stream fills A (through a gateway that knows only A); ``burst`` short requests at once."""
    with httpx.Client(timeout=120) as c, c.stream("POST", only_a_url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 3000, "stream": True,
            "logit_bias": NO_EOS}) as long:
        lines = long.iter_lines()
        next(lines)  # A is decoding it now
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:
            codes = list(pool.map(lambda i: chat(url, [{"role": "user", "content": f"short {i}"}], 2,
                                                 tools=False).status_code, range(burst)))
    return {"429": codes.count(429), "200": codes.count(200), "other": len(codes) - codes.count(429) -
            codes.count(200)}


def long_generation(url: str, max_tokens: int, key: str | None = None) -> dict:
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "Go on."}], "max_tokens": max_tokens, "stream": True,
        "logit_bias": NO_EOS, **({"prompt_cache_key": key} if key else {})})
    took = time.monotonic() - t0
    text = r.text
    return {"seconds": round(took, 2), "finished": '"finish_reason":"length"' in text,
            "error": re.search(r'"code":\s*"(\w+)"', text).group(1) if '"error"' in text else None}


def main(argv: list[str] | None = None) -> None:
    from deploy.processes import start_decoder, start_encoder, start_gateway

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--rpc-timeout-s", type=float, default=3.0)
    ap.add_argument("--long-tokens", type=int, default=3800)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(real_template_checkpoint(Path(tmp)))
        with start_encoder(ckpt) as enc, start_decoder(ckpt) as d1, start_decoder(ckpt) as d2, \
                start_gateway(ckpt, enc.encoder_addr, f"{d1.decoder_addr},{d2.decoder_addr}",
                              ["--rpc-timeout-s", str(a.rpc_timeout_s)]) as gw:
            url = f"http://127.0.0.1:{gw.gateway_port}"
            aff = affinity(url, a.conversations)
            long = long_generation(url, a.long_tokens)
        with start_decoder(ckpt, ["--max-active", "1", "--max-queue", "0"]) as full, start_decoder(ckpt) as idle, \
                start_gateway(ckpt, enc.encoder_addr, f"{full.decoder_addr},{idle.decoder_addr}") as gw, \
                start_gateway(ckpt, enc.encoder_addr, full.decoder_addr) as only_a:
            burst = full_replica(f"http://127.0.0.1:{gw.gateway_port}", f"http://127.0.0.1:{only_a.gateway_port}",
                                 a.burst)
    n = aff["n"]
    print("| measure | value |\n|---|---|")
    print(f"| turn 1 of {n} conversations (shared system prompt + 2 tools), per decoder | "
          f"{' / '.join(str(v) for v in aff['turn1_share'].values())} |")
    print(f"| turn 2 on turn 1's decoder | {aff['turn2_same']} / {n} |")
    print(f"| turn 2 with cached tokens > 0 | {aff['turn2_hits']} / {n} (mean {aff['turn2_cached_mean']:.0f} of "
          f"{aff['turn2_prompt_mean']:.0f} prompt tokens) |")
    print(f"| {a.burst} short requests, one decoder full, one idle: 429 | {burst['429']} (200: {burst['200']}, "
          f"other: {burst['other']}) |")
    print(f"| {a.long_tokens}-token stream, --rpc-timeout-s {a.rpc_timeout_s:g} | {long['seconds']} s, "
          f"{'finished' if long['finished'] else 'cut: ' + str(long['error'])} |")


if __name__ == "__main__":
    main()

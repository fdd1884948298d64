"""``mmserve-soak``: a bounded steady-load run that reports latency, errors and memory drift.

Not part of the test suite (it runs for minutes).  Starts 2 encoders, 2
decoders and a gateway on loopback (or uses ``--url`` against a running
gateway), keeps ``--concurrency`` clients sending mixed requests (text,
image, audio, both) for ``--minutes``, then prints requests/s, p50/p95/p99
latency, the error count (target 0) and each service's resident-memory drift
from the end of warm-up to the end of the run (target < 10 %).  The
decoder's prefix cache and the encoder's content cache grow by design up to
their byte bounds (``--prefix-cache-bytes``, default 2 GiB; ``--cache-bytes``),
so by default the run uses 16 MiB bounds that fill during the warm-up, and
prints each service's RSS every ``--sample-s`` to show the plateau.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import subprocess

    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) * 1024


def _content(i: int):
    from deploy.demo.media import shape_png, tone_wav

    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        shape_png(("red", "green", "blue")[i % 3], "circle", (32 + i % 17, 32))).decode(), "detail": "low"}}
    aud = {"type": "input_audio", "input_audio": {
        "data": base64.b64encode(tone_wav(0.3 + (i % 7) / 10, freq=300 + i % 50)).decode(), "format": "wav"}}
    text = {"type": "text", "text": f"request {i}"}
    return [[text], [text, img], [aud, text], [img, aud, text]][i % 4]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmserve-soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--url", help="a running gateway's base URL (default: start a local 2+2 cluster)")
    ap.add_argument("--sample-s", type=float, default=60.0, help="print each service's RSS this often")
    ap.add_argument("--decoder-args", default="--prefix-cache-bytes 16777216",
                    help="decoder flags (default: a 16 MiB prefix cache, which fills during warm-up)")
    ap.add_argument("--encoder-args", default="--cache-bytes 16777216",
                    help="encoder flags (default: a 16 MiB embedding cache)")
    args = ap.parse_args(argv)

    from openai import OpenAI

    from deploy.processes import start_decoder, start_encoder, start_gateway
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    stack = []
    pids: dict[str, int] = {}
    url = args.url
    if url is None:
        ckpt = str(write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="mmserve-soak-")) / "tiny", variant="e2b"))
        dargs = args.decoder_args.split()
        eargs = args.encoder_args.split()
        e1, e2 = start_encoder(ckpt, eargs), start_encoder(ckpt, eargs)
        d1, d2 = start_decoder(ckpt, dargs), start_decoder(ckpt, dargs)
        gw = start_gateway(ckpt, f"{e1.encoder_addr},{e2.encoder_addr}", f"{d1.decoder_addr},{d2.decoder_addr}")
        stack = [gw, d2, d1, e2, e1]
        pids = {"encoder-1": e1.procs["encoder"].pid, "encoder-2": e2.procs["encoder"].pid,
                "decoder-1": d1.procs["decoder"].pid, "decoder-2": d2.procs["decoder"].pid,
                "gateway": gw.procs["gateway"].pid}
        url = f"http://127.0.0.1:{gw.gateway_port}/v1"
    client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id  # any other name is 404 model_not_found
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    end = time.monotonic() + args.warmup_s + args.minutes * 60
    measure_from = time.monotonic() + args.warmup_s
    rss_start: dict[str, int] = {}

    def worker() -> None:
        while time.monotonic() < end:
            i = next(counter)
            t0 = time.monotonic()
            try:
                client.chat.completions.create(model=model, max_tokens=args.max_tokens,
                                               messages=[{"role": "user", "content": _content(i)}])
                ok = None
            except Exception as e:  # noqa: BLE001 - counted, reported
                ok = f"{type(e).__name__}: {e}"[:200]
            if t0 >= measure_from:
                with lock:
                    (errors.append(ok) if ok else latencies.append(time.monotonic() - t0))

    try:
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(worker) for _ in range(args.concurrency)]
            time.sleep(args.warmup_s)
            rss_start = {k: _rss(p) for k, p in pids.items()}
            t_start = time.monotonic()
            while not all(f.done() for f in futures):
                cf.wait(futures, timeout=args.sample_s)
                if pids:  # a time series shows a bounded fill apart from a leak
                    print(f"  t={time.monotonic() - t_start:6.0f}s  " + "  ".join(
                        f"{k} {_rss(p) / 1e6:.0f}MB" for k, p in pids.items()), flush=True)
            for f in futures:
                f.result()
        rss_end = {k: _rss(p) for k, p in pids.items()}
    finally:
        for s in stack:
            s.stop()
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    print(f"\nsoak: {args.minutes:g} min at concurrency {args.concurrency} (after {args.warmup_s:g} s warm-up)")
    print(f"requests {len(lat) + len(errors)}  ok {len(lat)}  errors {len(errors)}  "
          f"rate {len(lat) / (args.minutes * 60):.2f} req/s")
    print(f"latency ms  p50 {q(0.5):.0f}  p95 {q(0.95):.0f}  p99 {q(0.99):.0f}  "
          f"mean {statistics.mean(lat) * 1000 if lat else float('nan'):.0f}")
    for k in rss_start:
        a, b = rss_start[k], rss_end.get(k, 0)
        print(f"  {k:<10} RSS {a / 1e6:8.1f} MB -> {b / 1e6:8.1f} MB  drift {(b - a) / a * 100 if a else 0:+.1f} %")
    for e in sorted(set(errors))[:5]:
        print("  error:", e)


if __name__ == "__main__":
    main()

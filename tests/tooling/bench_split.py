"""``mmserve-bench``: TTFT and decode tokens/s, split path vs in-process mlx-vlm.

For each case (text / image / audio) it streams one greedy completion of
``--max-tokens`` tokens (EOS biased off so every run decodes the same count)
through the gateway → encoder → decoder processes, and the same prompt
through ``mlx_vlm.stream_generate`` in this process (on the services' BLAS), timing both the same
way at the caller: TTFT = first token's arrival, decode tok/s = tokens after
the first / time after the first.  Prints a table with the decode ratio
(target ≥ 0.95).  Not part of the test suite: timings are not asserts.
"""

from __future__ import annotations

import argparse
import base64
import math
import statistics
import tempfile
import time
from pathlib import Path


def _cases(tmp: Path):
    from deploy.demo.media import shape_png, tone_wav

    (tmp / "img.png").write_bytes(shape_png("red", "circle", (224, 224)))
    (tmp / "clip.wav").write_bytes(tone_wav(2.0, 16000))
    img = base64.b64encode((tmp / "img.png").read_bytes()).decode()
    aud = base64.b64encode((tmp / "clip.wav").read_bytes()).decode()
    return {
        "text": ([{"type": "text", "text": "Write a long story about a fox."}], [], []),
        "image": ([{"type": "text", "text": "Describe."},
                   {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}],
                  [str(tmp / "img.png")], []),
        "audio": ([{"type": "text", "text": "Transcribe."},
                   {"type": "input_audio", "input_audio": {"data": aud, "format": "wav"}}],
                  [], [str(tmp / "clip.wav")]),
    }


def _served_model(client) -> str:
    """The id the gateway serves (it answers any other name with 404 model_not_found)."""
    return client.models.list().data[0].id


def _split_run(client, content, max_tokens, bias):
    """Stream one completion; count tokens from the chunks' ``token_ids`` (a chunk may
    carry several tokens, and a token may complete no text)."""
    model = _served_model(client)
    t0 = time.perf_counter()
    first_at = last_at = None
    first_n = total = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        stream=True, logit_bias={str(k): -100 for k in bias}, extra_body={"return_token_ids": True},
    )
    for ch in stream:
        ids = (ch.choices[0].model_extra or {}).get("token_ids") if ch.choices else None
        if not ids:
            continue
        now = time.perf_counter()
        if first_at is None:
            first_at, first_n = now, len(ids)
        last_at = now
        total += len(ids)
    if total != max_tokens:
        raise RuntimeError(f"split path returned {total} tokens, expected {max_tokens}")
    rate = (total - first_n) / (last_at - first_at) if total > first_n else math.nan
    return first_at - t0, rate


def _ref_run(model, processor, content, images, audios, max_tokens, bias):
    from mlx_vlm import stream_generate

    tmpl = [{"type": "text", "text": p["text"]} if p["type"] == "text" else
            {"type": "image" if p["type"] == "image_url" else "audio"} for p in content]
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": tmpl}], tokenize=False,
                                                     add_generation_prompt=True)
    t0 = time.perf_counter()
    times = []
    for r in stream_generate(model, processor, prompt, image=images or None, audio=audios or None,
                             max_tokens=max_tokens, temperature=0.0, logit_bias={k: -100.0 for k in bias}):
        if r.finish_reason is None:  # the closing result repeats the last token
            times.append(time.perf_counter())
    if len(times) != max_tokens:
        raise RuntimeError(f"mlx-vlm returned {len(times)} tokens, expected {max_tokens}")
    return times[0] - t0, (len(times) - 1) / (times[-1] - times[0])


def _api_latency(svc, tmp: Path, repeats: int) -> list[tuple[str, float, float, int]]:
    """Same request (a 1 MP image + a 10 s clip, 8 tokens) over HTTP JSON and over the typed gRPC
    API: median end-to-end ms and request bytes on the wire.  Caches are off in these services,
    so every repeat encodes again."""
    import io
    import json

    import numpy as np
    from openai import OpenAI
    from PIL import Image as PILImage

    from deploy.demo.media import tone_wav
    from mmserve_core.client import Audio, ChatClient, Image, chat_request

    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(buf, "PNG")
    png, wav = buf.getvalue(), tone_wav(10.0, 16000)
    http_msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode(),
                                            "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "What is this?"}]}]
    grpc_msgs = [{"role": "user", "content": [Image(png, detail="low"), Audio(wav, "wav"), "What is this?"]}]
    kw = dict(max_tokens=8, temperature=0)
    oa = OpenAI(base_url=svc.base_url, api_key="x")
    model = _served_model(oa)
    http_bytes = len(json.dumps({"model": model, "messages": http_msgs, **kw}).encode())
    grpc_bytes = len(chat_request(grpc_msgs, **kw).SerializeToString())
    rows = []
    with ChatClient(svc.chat_addr) as chat:
        for name, call, size in (("HTTP JSON", lambda: oa.chat.completions.create(model=model, messages=http_msgs, **kw),
                                  http_bytes),
                                 ("gRPC chat", lambda: chat.chat(grpc_msgs, **kw), grpc_bytes)):
            call()  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1000)
            rows.append((name, statistics.median(times), min(times), size))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmserve-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint dir (default: a generated tiny one)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from mmserve_core.runtime.blas import preload_optimized_blas

    preload_optimized_blas()  # in-process mlx-vlm on the services' BLAS, or the ratio compares BLASes

    from mlx_vlm import load
    from openai import OpenAI

    from deploy.processes import start_services
    from mmserve_core.runtime.checkpoint import read_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mmserve-bench-"))
    ckpt = args.checkpoint
    if ckpt is None:
        from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

        ckpt = str(write_tiny_checkpoint(tmp / "tiny-gemma4", variant="e2b"))
    info = read_checkpoint(ckpt)
    bias = info.eos_token_ids()
    cases = _cases(tmp)
    if not info.has_audio_tower:
        cases.pop("audio")
    rows = []
    model, processor = load(ckpt)
    # caches off: every repeat pays for its encode and prefill, as the in-process reference does
    with start_services(ckpt, encoder_args=["--cache-bytes", "0"],
                        decoder_args=["--prefix-cache-bytes", "0"]) as svc:
        client = OpenAI(base_url=svc.base_url, api_key="x")
        for name, (content, images, audios) in cases.items():
            _split_run(client, content, 4, bias)  # warm-up
            _ref_run(model, processor, content, images, audios, 4, bias)
            split, ref = [], []
            for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
                split.append(_split_run(client, content, args.max_tokens, bias))
                ref.append(_ref_run(model, processor, content, images, audios, args.max_tokens, bias))
            s_ttft = statistics.median(x[0] for x in split) * 1000
            s_tps = statistics.median(x[1] for x in split)
            r_ttft = statistics.median(x[0] for x in ref) * 1000
            r_tps = statistics.median(x[1] for x in ref)
            rows.append((name, s_ttft, r_ttft, s_tps, r_tps, s_tps / r_tps))
        api_rows = _api_latency(svc, tmp, args.repeats)
    print(f"\ncheckpoint: {ckpt}  max_tokens={args.max_tokens}  repeats={args.repeats} (medians)")
    print(f"{'case':<8} {'TTFT split ms':>14} {'TTFT mlx-vlm ms':>16} {'decode split tok/s':>19} "
          f"{'decode mlx-vlm tok/s':>21} {'decode ratio':>13}")
    for name, st, rt, sp, rp, ratio in rows:
        print(f"{name:<8} {st:>14.1f} {rt:>16.1f} {sp:>19.1f} {rp:>21.1f} {ratio:>13.3f}")
    print("\nsame request (1 MP image + 10 s clip, 8 tokens) end to end, two fronts:")
    print(f"{'front':<10} {'median ms':>10} {'best ms':>9} {'request bytes':>14}")
    for name, med, best, size in api_rows:
        print(f"{name:<10} {med:>10.1f} {best:>9.1f} {size:>14}")


if __name__ == "__main__":
    main()

"""``mmserve-demo``: the README's main job.

Starts the encoder, decoder and gateway as three processes on loopback with a
freshly generated tiny Gemma 4 checkpoint (or ``--checkpoint DIR``), sends one
chat request with an image and an audio clip through the official ``openai``
client (once streamed, once not), prints the reply, usage and timings, and
stops the services.  The tiny checkpoint has random weights, so its reply is
arbitrary text: the point is the path, the token counts and the timings.
"""

from __future__ import annotations

import argparse
import base64
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmserve-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of a generated tiny one")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    from openai import OpenAI

    from mmserve_common.launcher import start_services
    from mmserve_common.samples import shape_png, tone_wav

    tmp = tempfile.TemporaryDirectory(prefix="mmserve-demo-")
    ckpt = args.checkpoint
    if ckpt is None:
        from mmserve_common.tiny_checkpoint import write_tiny_checkpoint

        ckpt = str(write_tiny_checkpoint(Path(tmp.name) / "tiny-gemma4", variant="e2b"))
        print(f"generated tiny Gemma 4 checkpoint: {ckpt}")
    t0 = time.perf_counter()
    with start_services(ckpt) as svc:
        print(f"services ready in {time.perf_counter() - t0:.1f}s: encoder {svc.encoder_addr}, "
              f"decoder {svc.decoder_addr}, gateway {svc.base_url}")
        client = OpenAI(base_url=svc.base_url, api_key="not-needed")
        image = base64.b64encode(shape_png("red", "circle")).decode()
        audio = base64.b64encode(tone_wav(2.0, rate=44100)).decode()
        messages = [{
            "role": "user",
            "content": [
                {"type": "text", "text": "What do you see and hear?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            ],
        }]
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                           temperature=0)
        print(f"\nmodel: {model}")
        print(f"reply: {r.choices[0].message.content!r}")
        print(f"finish_reason: {r.choices[0].finish_reason}")
        u = r.usage
        soft = (u.prompt_tokens_details.model_extra or {}).get("soft_tokens") if u.prompt_tokens_details else None
        print(f"usage: prompt_tokens={u.prompt_tokens} (soft tokens {soft}) "
              f"completion_tokens={u.completion_tokens} total_tokens={u.total_tokens}")
        print(f"timings (ms): {(r.model_extra or {}).get('timings')}")
        print("\nstreamed: ", end="", flush=True)
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            if chunk.usage:
                print(f"\nstreamed usage: {chunk.usage.prompt_tokens} prompt + "
                      f"{chunk.usage.completion_tokens} completion tokens")
    print("services stopped")
    tmp.cleanup()


if __name__ == "__main__":
    main()

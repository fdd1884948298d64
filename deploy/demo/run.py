"""``mmserve-demo``: the README's main job.

Starts the encoder, decoder and gateway as three processes on loopback with
the built-in demo checkpoint (a tiny Gemma 4 trained on generated data:
coloured shapes, spoken digits, a few fixed phrases; see
``deploy/demo/tiny-gemma4-demo/CARD.md``) or ``--checkpoint DIR``,
generates a fresh image, a spoken clip and a short video with a spoken digit
on its own audio track, asks about them through the official ``openai``
client (image, clip, both in one turn, the video, plain text, then the same
streamed), prints each reply beside the right answer, usage and timings, and
stops the services.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _clip(rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    """A spoken digit: synthesised now if espeak-ng is here, else one of the shipped held-out samples."""
    from deploy.demo import tasks

    if tasks.have_espeak():
        wav, word = tasks.spoken_digit(rng)
        return wav, word, "synthesised with espeak-ng just now"
    import soundfile as sf

    samples = sorted((Path(tasks.__file__).parent / "samples").glob("*.wav"))
    path = samples[int(rng.integers(len(samples)))]
    wav, _ = sf.read(path, dtype="float32")
    return wav, path.stem.split("-")[0], f"shipped sample {path.name} (espeak-ng not installed)"


def _ask_all(client, model: str, questions, graded: bool, max_tokens: int, drafts: list[int]) -> int:
    """Each question through the openai client, printed beside its answer; how many were wrong.
    ``drafts`` [drafted, accepted] sums each reply's drafting counts (its ``timings``)."""
    from deploy.demo.tasks import content

    wrong = 0
    for name, parts, want in questions:
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": content(parts)}])
        t = (r.model_extra or {}).get("timings") or {}
        drafts[0] += t.get("draft_tokens", 0)
        drafts[1] += t.get("draft_accepted_tokens", 0)
        got = r.choices[0].message.content or ""
        asked = " + ".join(v if k == "text" else f"<{k}>" for k, v in parts)
        ok, mark = _grade(got, want, graded)
        wrong += not ok
        print(f"[{name}] {asked}\n    -> {got!r}{mark}")
    return wrong


def _usage_and_stream(client, model: str, parts, max_tokens: int) -> None:
    """The image + clip question once more: its usage and timings, then streamed."""
    from deploy.demo.tasks import content

    r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": content(parts)}])
    u = r.usage
    soft = (u.prompt_tokens_details.model_extra or {}).get("soft_tokens") if u.prompt_tokens_details else None
    print(f"\nusage (image + clip): prompt_tokens={u.prompt_tokens} (soft tokens {soft}) "
          f"completion_tokens={u.completion_tokens} total_tokens={u.total_tokens}")
    print(f"timings (ms): {(r.model_extra or {}).get('timings')}")
    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": content(parts)}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\nstreamed usage: {chunk.usage.prompt_tokens} prompt + "
                  f"{chunk.usage.completion_tokens} completion tokens")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmserve-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of the built-in demo one")
    ap.add_argument("--seed", default="0", help="which image and clip to generate: a number (default 0, so the "
                    "output is reproducible) or 'random'; the model misses ~1-3 %% of held-out items (see its card)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--no-draft", action="store_true",
                    help="decode without the demo model's MTP drafter (shipped beside it)")
    args = ap.parse_args(argv)

    from openai import OpenAI

    from deploy.demo import tasks
    from deploy.demo.checkpoint_path import DRAFTER_DIR, demo_checkpoint
    from deploy.processes import start_services

    ckpt = args.checkpoint or str(demo_checkpoint())
    graded = args.checkpoint is None  # the demo model knows the right answers; a real one is free-form
    seed = int(time.time()) % 1_000_000 if args.seed == "random" else int(args.seed)
    rng = np.random.default_rng(tasks.HELD_OUT_SEED + 10_000_000 + seed)  # never a training seed
    image, label = tasks.shape_image(rng)
    wav, word, clip_origin = _clip(rng)
    video, video_answer = tasks.video_clip(rng, _clip(rng)[:2])
    print(f"checkpoint: {ckpt}")
    print(f"generated (seed {seed}): a 192x192 PNG of a {label}; a 1 s clip of someone saying "
          f"{word!r} ({clip_origin}); a 2 s MP4 of a {video_answer.split(',')[0]} with a spoken "
          f"{video_answer.split(', ')[1]!r} on its own audio track")
    questions = [
        ("image", [("text", "What is in this image?"), ("image", image)], label),
        ("audio", [("audio", wav), ("text", "What word is spoken?")], word),
        ("both", [("image", image), ("audio", wav), ("text", "What do you see and hear?")], f"{label}, {word}"),
        ("both, clip first", [("audio", wav), ("image", image)], f"{word}, {label}"),
        ("video and its track", [("text", "What happens in this video?"), ("video", video)], video_answer),
        ("text", [("text", "What can you do?")], tasks.CANNED["what can you do?"]),
        ("other text", [("text", "Write me a poem about the sea.")], tasks.REFUSAL),
    ]
    t0 = time.perf_counter()
    # the demo model learned "Transcribe the clip." among its audio prompts; a real checkpoint gets
    # the gateway's default (Gemma's own ASR instruction)
    gateway_args = ["--transcription-instruction", "Transcribe the clip."] if graded else []
    # the demo model's own MTP drafter (distilled from it): the same answers, fewer LM forwards
    draft = graded and not args.no_draft and (DRAFTER_DIR / "model.safetensors").exists()
    decoder_args = ["--draft-model", str(DRAFTER_DIR)] if draft else []
    drafts = [0, 0]
    with start_services(ckpt, gateway_args=gateway_args, decoder_args=decoder_args) as svc:
        print(f"services ready in {time.perf_counter() - t0:.1f}s: encoder {svc.encoder_addr}, "
              f"decoder {svc.decoder_addr}, gateway {svc.base_url}\n")
        client = OpenAI(base_url=svc.base_url, api_key="not-needed")
        model = client.models.list().data[0].id
        wrong = _ask_all(client, model, questions, graded, args.max_tokens, drafts)
        if graded:  # one constrained answer, over the typed gRPC API: only the 18 answers can be said
            wrong += not _constrained_answer(svc.chat_addr, image, label, args.max_tokens)
        heard = client.audio.transcriptions.create(model=model, file=("clip.wav", tasks.wav_bytes(wav))).text
        ok, mark = _grade(heard, word, graded)
        wrong += not ok
        print(f"[transcription] POST /v1/audio/transcriptions <clip.wav>\n    -> {heard!r}{mark}")
        _usage_and_stream(client, model, questions[2][1], args.max_tokens)
    print("services stopped")
    if draft:
        share = f" ({100 * drafts[1] / drafts[0]:.0f} %)" if drafts[0] else ""
        print(f"MTP drafter ({DRAFTER_DIR.name}): {drafts[1]} of {drafts[0]} drafted tokens accepted{share} "
              "over the graded chat answers")
    if graded:
        asked = len(questions) + 2  # + the constrained answer and the transcription
        print(f"{asked - wrong}/{asked} answers right"
              + ("" if not wrong else " (held-out accuracy is in the model's card: CARD.md)"))


def _grade(got: str, want: str, graded: bool) -> tuple[bool, str]:
    """(right, the mark printed after the answer); a real checkpoint's answers are not graded."""
    from deploy.demo.tasks import normalize

    if not graded:
        return True, ""
    ok = normalize(got) == normalize(want)
    return ok, "  ✓" if ok else f"  ✗ (right answer: {want!r})"


def _constrained_answer(chat_addr: str, image, label: str, max_tokens: int) -> bool:
    """The picture again, through the typed gRPC API with a regex constraint that admits only the
    demo model's 18 possible answers: the decoder masks every other token."""
    from deploy.demo import tasks
    from mmserve_core.client import ChatClient, Constraint, Image

    pattern = f"({'|'.join(tasks.COLORS)}) ({'|'.join(tasks.SHAPES)})"
    with ChatClient(chat_addr) as chat:
        reply = chat.chat([{"role": "user", "content": ["What is in this image?", Image(tasks.png_bytes(image))]}],
                          temperature=0, max_tokens=max_tokens, constraint=Constraint("regex", pattern))
    ok = reply.content == label
    print(f"[constrained, gRPC] <image> under regex {pattern!r}\n    -> {reply.content!r}"
          + ("  ✓" if ok else f"  ✗ (right answer: {label!r})"))
    return ok


if __name__ == "__main__":
    main()

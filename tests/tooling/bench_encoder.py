"""``mmserve-bench-encoder``: throughput, batching, cache and memory of the encoder service.

Prints tables (never asserts — timings belong in benchmarks, not tests):

1. items/s for images and for 5 s clips at 1, 4 and 8 concurrent callers,
   batched (``--max-batch 8``) vs unbatched (``--max-batch 1``), cache off,
   every item distinct; target: batched ≥ 2× unbatched at 8 callers;
2. cache-hit vs miss latency for one image (target: hit ≤ 5 % of miss);
3. embedding bytes/s over loopback (cache hits, float32): 32 small items a request on the
   tiny checkpoint (hidden 64), and 4 items a request on one whose LM hidden size is E2B's
   (1,536: 1.57 MB an image, as real checkpoints send) with 1 and 2 callers, beside what
   grpc-python alone moves (a bare server of prebuilt frames, a client that parses nothing);
   target ≥ 1 GB/s;
4. video: clips/s and sampled frames/s at 1 and 4 callers (4 s clips, 8 fps, 320x192, with their
   own audio track; cache off, distinct clips), and a clip's cache hit vs miss, on the E2B-shaped
   (towers) and unified-shaped (embedders) checkpoints;
5. resident memory of an encoder on a checkpoint whose language model is
   ~150 MB against one whose LM is tiny: the towers-only claim predicts the
   same RSS for both, whatever the LM weighs.

Each encoder is its own OS process on loopback; only one runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_bytes(pid: int) -> int:
    if platform.system() == "Linux":
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


def _weight_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes per top-level module, read from the safetensors headers (no tensor data)."""
    sizes: dict[str, int] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            top = name.split(".")[0]
            sizes[top] = sizes.get(top, 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


def _images(n: int, size: int = 256) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _clips(n: int, seconds: float) -> list[bytes]:
    from deploy.demo.media import tone_wav

    return [tone_wav(seconds, 16000, freq=200.0 + 37.0 * i) for i in range(n)]


def _videos(n: int, seconds: float = 4.0, fps: int = 8) -> list[bytes]:
    from deploy.demo.media import shape_frames, video_bytes

    out = []
    for i in range(n):
        t = np.arange(int(seconds * 16000)) / 16000
        track = (0.3 * np.sin(2 * np.pi * (200 + 31 * i) * t)).astype(np.float32)
        frames = shape_frames(["red", "blue", "green"][i % 3], ["circle", "square", "triangle"][i % 3],
                              ["left", "right", "up", "down"][i % 4], frames=int(seconds * fps), size=(320, 192))
        out.append(video_bytes(frames, fps=fps, audio=track))
    return out


async def _video_run(addr: str, clips: list[bytes], callers: int) -> tuple[float, float]:
    """(clips/s, sampled frames/s) with ``callers`` requests in flight."""
    client = _client(addr)
    queue: asyncio.Queue = asyncio.Queue()
    for c in clips:
        queue.put_nowait(c)
    frames = 0

    async def caller():
        nonlocal frames
        while not queue.empty():
            n = len((await client.encode_video(queue.get_nowait())).frame_seconds)
            frames += n  # after the await: ``frames += await …`` would read frames before it and lose updates

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    dt = time.perf_counter() - t0
    await client.close()
    return len(clips) / dt, frames / dt


async def _video_cache(addr: str, clips: list[bytes]) -> tuple[float, float]:
    client = _client(addr)
    miss, hit = [], []
    for c in clips:
        t0 = time.perf_counter()
        await client.encode_video(c)
        miss.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert (await client.encode_video(c)).cache_hit
        hit.append(time.perf_counter() - t0)
    await client.close()
    return statistics.median(miss) * 1000, statistics.median(hit) * 1000


def _video_table(ckpts: dict[str, Path], n: int) -> None:
    from deploy.processes import start_encoder

    print(f"\n{'video (4 s, 8 fps, 320x192, track)':<36} {'callers':>7} {'clips/s':>8} {'frames/s':>9}")
    caches = {}
    for label, ckpt in ckpts.items():
        with start_encoder(ckpt, ["--cache-bytes", "0"]) as svc:
            asyncio.run(_video_run(svc.encoder_addr, _videos(1, fps=8), 1))  # warm-up
            for c in (1, 4):
                cps, fps = asyncio.run(_video_run(svc.encoder_addr, _videos(n), c))
                print(f"{label:<36} {c:>7} {cps:>8.2f} {fps:>9.1f}")
        with start_encoder(ckpt) as svc:
            caches[label] = asyncio.run(_video_cache(svc.encoder_addr, _videos(4)))
    for label, (miss, hit) in caches.items():
        print(f"video cache, {label}: miss {miss:.1f} ms  hit {hit:.2f} ms  hit/miss {hit / miss * 100:.1f} %")


def _client(addr: str):
    from mmserve_core.client import AsyncEncoderClient

    return AsyncEncoderClient(addr)


async def _encode(client, modality: str, data: bytes, budget: int = 0) -> int:
    """Encode one item through the public asyncio client; the embedding's bytes."""
    from mmserve_core.wire.types import IMAGE

    if modality == IMAGE:
        enc = await client.encode_image(data, soft_tokens=budget)
    else:
        enc = await client.encode_audio(data)
    return enc.rows.nbytes


async def _throughput(addr: str, modality: int, payloads: list[bytes], callers: int, budget: int) -> float:
    client = _client(addr)
    queue: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)

    async def caller():
        while not queue.empty():
            await _encode(client, modality, queue.get_nowait(), budget)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    dt = time.perf_counter() - t0
    await client.close()
    return len(payloads) / dt


async def _cache_latency(addr: str, images: list[bytes], budget: int) -> tuple[float, float]:
    from mmserve_core.wire.types import IMAGE

    client = _client(addr)
    miss, hit = [], []
    for img in images:
        t0 = time.perf_counter()
        await _encode(client, IMAGE, img, budget)
        miss.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await _encode(client, IMAGE, img, budget)
        hit.append(time.perf_counter() - t0)
    await client.close()
    return statistics.median(miss) * 1000, statistics.median(hit) * 1000


async def _bytes_per_s(addr: str, image: bytes, items: int, repeats: int, callers: int = 1) -> tuple[float, int]:
    """Embedding bytes/s of cache hits: ``items`` copies of one small PNG per request, float32
    out, so the response (not the upload, not the towers) dominates; ``callers`` requests in
    flight at once on one channel, as a gateway's concurrent requests share its channel."""
    from mmserve_core.wire.types import IMAGE, MediaInput

    client = _client(addr)
    req = [MediaInput(IMAGE, image)] * items

    async def once() -> int:  # the whole response reassembled, as every caller receives it
        return sum(e.rows.nbytes for e in await client.encode(req, "float32"))

    async def caller() -> None:
        for _ in range(repeats):
            await once()

    size = await once()  # computes once, caches
    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    dt = time.perf_counter() - t0
    await client.close()
    return size * repeats * callers / dt, size


def _ceiling_server(payload_bytes: int, chunk_bytes: int, port_q) -> None:
    """A bare gRPC server streaming prebuilt chunk frames: no encoder, no cache, no protobuf."""
    import os

    import grpc

    from mmserve_core.wire.chunk_frames import write_chunk

    data = os.urandom(payload_bytes)
    frames = [write_chunk(0, off, data[off:off + chunk_bytes]) for off in range(0, payload_bytes, chunk_bytes)]

    async def serve() -> None:
        async def stream(request, context):
            for f in frames:
                yield f

        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
        handler = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None, response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("ceiling.Ceiling", {"Get": handler}),))
        port_q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def _grpc_ceiling(payload_bytes: int, chunk_bytes: int, repeats: int = 40) -> float:
    """Bytes/s grpc-python itself moves over loopback here: a server process streaming prebuilt
    frames, a client that does not even parse them.  The honest bound for the loopback figure."""
    import multiprocessing as mp

    import grpc

    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_ceiling_server, args=(payload_bytes, chunk_bytes, q), daemon=True)
    proc.start()
    port = q.get(timeout=60)

    async def run() -> float:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            get = ch.unary_stream("/ceiling.Ceiling/Get", request_serializer=None, response_deserializer=None)
            best = 0.0
            for _ in range(2):
                t0, n = time.perf_counter(), 0
                for _ in range(repeats):
                    async for m in get(b""):
                        n += len(m)
                best = max(best, n / (time.perf_counter() - t0))
            return best

    try:
        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.join()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmserve-bench-encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint dir (default: a generated tiny E2B-shaped one)")
    ap.add_argument("--items", type=int, default=24, help="distinct items per throughput run")
    ap.add_argument("--budget", type=int, default=70, help="image soft-token budget (70/140/280/560/1120)")
    ap.add_argument("--clip-seconds", type=float, default=5.0)
    ap.add_argument("--callers", default="1,4,8")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--video-items", type=int, default=8, help="distinct clips per video run")
    args = ap.parse_args(argv)

    from deploy.processes import start_encoder
    from mmserve_core.runtime.heap import keep_large_buffers_in_heap
    from mmserve_core.wire.types import AUDIO, IMAGE

    keep_large_buffers_in_heap()  # this process receives embeddings as the gateway does: tuned alike
    from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mmserve-bench-enc-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else write_tiny_checkpoint(tmp / "tiny-e2b", variant="e2b")
    callers = [int(c) for c in args.callers.split(",")]
    images, clips = _images(args.items), _clips(args.items, args.clip_seconds)
    img, aud = IMAGE, AUDIO

    rows = []
    results: dict[tuple[str, int, int], float] = {}
    for max_batch in (8, 1):
        with start_encoder(ckpt, ["--max-batch", str(max_batch), "--cache-bytes", "0"]) as svc:
            asyncio.run(_throughput(svc.encoder_addr, img, images[:2], 1, args.budget))  # warm-up
            for name, mod, payloads in (("image", img, images), (f"audio {args.clip_seconds:g}s", aud, clips)):
                for c in callers:
                    results[(name, c, max_batch)] = asyncio.run(
                        _throughput(svc.encoder_addr, mod, payloads, c, args.budget))
    for name in ("image", f"audio {args.clip_seconds:g}s"):
        for c in callers:
            b, u = results[(name, c, 8)], results[(name, c, 1)]
            rows.append((name, c, b, u, b / u))
    print(f"\ncheckpoint: {ckpt}  items={args.items}  image budget={args.budget}  (cache off, distinct items)")
    print(f"{'input':<12} {'callers':>7} {'batched items/s':>16} {'unbatched items/s':>18} {'speed-up':>9}")
    for name, c, b, u, r in rows:
        print(f"{name:<12} {c:>7} {b:>16.2f} {u:>18.2f} {r:>8.2f}x")

    with start_encoder(ckpt) as svc:
        miss_ms, hit_ms = asyncio.run(_cache_latency(svc.encoder_addr, _images(8, 320)[:8], args.budget))
        from deploy.demo.media import shape_png

        bps, size = asyncio.run(_bytes_per_s(svc.encoder_addr, shape_png(size=(224, 224)), 32, 20))
    wide = write_tiny_checkpoint(tmp / "tiny-e2b-h1536", variant="e2b", overrides={"text_config": {"hidden_size": 1536}})
    with start_encoder(wide) as svc:
        wide_bps, wide_size = asyncio.run(_bytes_per_s(svc.encoder_addr, shape_png(size=(224, 224)), 4, 40))
        wide2_bps, _ = asyncio.run(_bytes_per_s(svc.encoder_addr, shape_png(size=(224, 224)), 4, 20, callers=2))
    print(f"\ncache: miss {miss_ms:.2f} ms  hit {hit_ms:.2f} ms  hit/miss {hit_ms / miss_ms * 100:.1f} %")
    print(f"{'loopback (cache hits, float32)':<34} {'MB a response':>14} {'MB/s':>8}")
    print(f"{'32 items, hidden 64':<34} {size / 1e6:>14.2f} {bps / 1e6:>8.1f}")
    print(f"{'4 items, hidden 1536 (E2B)':<34} {wide_size / 1e6:>14.2f} {wide_bps / 1e6:>8.1f}")
    print(f"{'  the same, 2 callers at once':<34} {wide_size / 1e6:>14.2f} {wide2_bps / 1e6:>8.1f}")
    ceiling = _grpc_ceiling(wide_size, wide_size // 4)
    print(f"{'grpc-python alone (same bytes)':<34} {wide_size / 1e6:>14.2f} {ceiling / 1e6:>8.1f}"
          f"   <- one caller, prebuilt frames, nothing parsed: the transport's own bound; the E2B "
          f"case (one caller) at {wide_bps / ceiling * 100:.0f} %")

    _video_table({"E2B-shaped (towers)": ckpt,
                  "unified-shaped (embedders)": write_tiny_checkpoint(tmp / "tiny-unified", variant="unified")},
                 args.video_items)
    if args.skip_memory:
        return
    big = write_tiny_checkpoint(tmp / "tiny-e2b-big-lm", variant="e2b", lm_intermediate_size=65536)
    print(f"\n{'checkpoint':<18} {'LM weights MB':>14} {'tower weights MB':>17} {'encoder RSS MB':>15}")
    for label, path in (("tiny LM", ckpt), ("~150 MB LM", big)):
        sizes = _weight_bytes(Path(path))
        towers = sum(v for k, v in sizes.items() if k in ("vision_tower", "embed_vision", "audio_tower",
                                                           "embed_audio"))
        lm = sizes.get("language_model", 0)
        with start_encoder(path) as svc:
            asyncio.run(_throughput(svc.encoder_addr, img, images[:2], 1, args.budget))
            rss = _rss_bytes(svc.procs["encoder"].pid)
        print(f"{label:<18} {lm / 1e6:>14.1f} {towers / 1e6:>17.2f} {rss / 1e6:>15.1f}")
    print("(towers only: RSS must not grow with the LM's size)")


if __name__ == "__main__":
    main()

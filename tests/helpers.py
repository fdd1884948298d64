"""Test helpers: OpenAI message builders and the in-process mlx-vlm reference."""

from __future__ import annotations

import base64
import contextlib
import functools
import math
import struct
from pathlib import Path


def image_part(path: Path) -> dict:
    mime = "image/jpeg" if path.suffix == ".jpg" else "image/png"
    b64 = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}


def audio_part(path: Path) -> dict:
    fmt = "flac" if path.suffix == ".flac" else "wav"
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": fmt}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


@functools.lru_cache(maxsize=4)
def _load_reference(ckpt: str):
    from mlx_vlm import load

    return load(ckpt)


@contextlib.contextmanager
def unified_vision_bidirectional():
    """mlx-vlm's unified model with the attention its config asks for over image and video blocks.

    The config says ``use_bidirectional_attention: "vision"``, which transformers' Gemma 4 honours for
    every prompt: each image (and video frame) block attends to itself both ways, with or without audio.
    ``mlx_vlm.generate`` passes ``mm_token_type_ids`` to the language model and does the same for
    image-only prompts, but chunks prompts that mix images and audio, and its overlay skips a chunk
    (causal there).  The reference the split decoder is compared with is mlx-vlm unchanged except that a
    prompt holding image or video tokens is prefilled in one pass: the same weights, the same mask code,
    the mask the config asks for."""
    from mlx_vlm.models.gemma4_unified import gemma4_unified as U

    def one_pass(self, input_ids=None, **kw):
        types = kw.get("mm_token_type_ids")
        if types is not None:
            import mlx.core as mx

            return bool(mx.any((types == 1) | (types == 2)).item())
        ids = [t for t in (self.config.image_token_id, self.config.video_token_id) if t is not None]
        return input_ids is not None and any(bool((input_ids == t).any().item()) for t in ids)

    saved = U.Model._should_disable_chunked_prefill
    U.Model._should_disable_chunked_prefill = one_pass
    try:
        yield
    finally:
        U.Model._should_disable_chunked_prefill = saved


def reference_generate(ckpt: Path, content: list[dict], media: list[Path], max_tokens: int, *,
                       stock_unified: bool = False) -> dict:
    """Greedy ``mlx_vlm.generate`` on the whole checkpoint in this process (for the unified model,
    with the image attention its config asks for: ``unified_vision_bidirectional``; ``stock_unified``:
    mlx-vlm's own, causal over images).

    The prompt is rendered by the checkpoint's own template from the same
    parts; placeholder and boundary ids get the same -inf bias the decoder
    applies, so both sides sample from the same distribution.
    """
    import json

    from mlx_vlm import generate

    model, processor = _load_reference(str(ckpt))
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    tmpl_content = []
    for p in content:
        if p["type"] == "text":
            tmpl_content.append({"type": "text", "text": p["text"]})
        elif p["type"] == "image_url":
            tmpl_content.append({"type": "image"})
        else:
            tmpl_content.append({"type": "audio"})
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": tmpl_content}], tokenize=False, add_generation_prompt=True
    )
    cfg.setdefault("eoa_token_id", cfg.get("eoa_token_index"))  # the unified config's name for it
    suppress = [cfg[k] for k in ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id",
                                 "eoi_token_id", "boa_token_id", "eoa_token_id")]
    images = [str(m) for m in media if m.suffix in (".png", ".jpg")]
    audios = [str(m) for m in media if m.suffix in (".wav", ".flac")]
    unified = cfg.get("model_type") == "gemma4_unified" and not stock_unified
    with unified_vision_bidirectional() if unified else contextlib.nullcontext():
        r = generate(model, processor, prompt, image=images or None, audio=audios or None,
                     max_tokens=max_tokens, temperature=0.0, logit_bias={i: -math.inf for i in suppress})
    from mlx_vlm.utils import prepare_inputs

    inputs = prepare_inputs(processor, images=images or None, audio=audios or None, prompts=prompt,
                            add_special_tokens=False)
    return {"token_ids": [int(t) for t in r.token_ids], "prompt_ids": [int(x) for x in inputs["input_ids"][0].tolist()]}


def video_part(data: bytes, mime: str = "video/mp4", **options) -> dict:
    """An OpenAI-style ``video_url`` part (``options``: fps, max_frames, audio_track)."""
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}",
                                               **options}}


def reference_video_generate(ckpt: Path, text: str, frames, fps: float, track, max_tokens: int) -> dict:
    """Greedy ``mlx_vlm.generate`` on a video given as already-sampled frames ``[T, H, W, 3]`` (mlx-vlm
    then stamps frame j at j / ``fps``) and, when ``track`` (mono float32 at the model rate) is given,
    that waveform as an audio clip right after the video in the same user turn."""
    import json

    import numpy as np
    from mlx_vlm import generate
    from mlx_vlm.utils import prepare_inputs

    model, processor = _load_reference(str(ckpt))
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    content = [{"type": "text", "text": text}, {"type": "video"}] + ([{"type": "audio"}] if track is not None else [])
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
    cfg.setdefault("eoa_token_id", cfg.get("eoa_token_index"))
    suppress = [cfg[k] for k in ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id",
                                 "eoi_token_id", "boa_token_id", "eoa_token_id")]
    videos = [np.transpose(np.asarray(frames), (0, 3, 1, 2))]
    audio = [np.asarray(track, np.float32)] if track is not None else None
    unified = cfg.get("model_type") == "gemma4_unified"
    with unified_vision_bidirectional() if unified else contextlib.nullcontext():
        r = generate(model, processor, prompt, audio=audio, video=videos, fps=fps, max_tokens=max_tokens,
                     temperature=0.0, logit_bias={i: -math.inf for i in suppress})
    inputs = prepare_inputs(processor, audio=audio, videos=videos, prompts=prompt, add_special_tokens=False, fps=fps)
    return {"token_ids": [int(t) for t in r.token_ids],
            "prompt_ids": [int(x) for x in inputs["input_ids"][0].tolist()]}


def exif_block(entries: list[tuple[int, int, int, bytes]], *, ifd_offset: int = 8) -> bytes:
    """A little-endian EXIF (TIFF) block with one IFD of ``(tag, type, count, value-or-data)``;
    values over 4 bytes follow the IFD."""
    out = b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00" * (ifd_offset - 8)
    data_at = ifd_offset + 2 + 12 * len(entries) + 4
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, count, val in entries:
        if len(val) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + val.ljust(4, b"\x00")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, data_at + len(extra))
            extra += val
    return out + ifd + struct.pack("<I", 0) + extra

"""Training sequences rendered exactly as the gateway renders a request.

Why: the demo model must learn soft-token blocks where serving puts them —
inside the user turn, at the media part's position — so the sequences are
built with the gateway's own ``PromptBuilder`` (same chat template, same
text-marker tokenization, same ``begin + N x placeholder + end`` blocks), not
with a re-implementation that could drift from it.  Pure Python (tokenizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deploy.demo.tasks import Example
from mmserve_core.prompt import MediaTokens, PromptBuilder, PromptMedia, prompt_media
from mmserve_core.wire import types as T
from mmserve_core.wire.tensors import RawTensor
from mmserve_core.wire.types import Message, Part

TURN_END = "<turn|>"


@dataclass(frozen=True)
class VideoInputs:
    """A video as the encoder service sees it: its sampled frames' rows and stamps, its own track."""

    pixels: object  # [frames, patches, patch dim] float32, the video processor's
    positions: object  # [frames, patches, 2]
    frame_rows: int
    stamps: tuple[float, ...]
    track: object  # mono float32 at 16 kHz

    @property
    def track_rows(self) -> int:
        return math.ceil(len(self.track) / 16000 * 1000 / 40)


@dataclass(frozen=True)
class Sequence:
    prompt: list[int]  # what the gateway sends the decoder (ends with the model-turn header)
    answer: list[int]  # the reply's tokens and the end-of-turn token


class Sequencer:
    def __init__(self, tokenizer, config: dict, image_rows: int, audio_rows: int) -> None:
        self.tokenizer = tokenizer
        media = {"image": MediaTokens(config["image_token_id"], config["boi_token_id"], config["eoi_token_id"]),
                 "video": MediaTokens(config["video_token_id"], config["boi_token_id"], config["eoi_token_id"])}
        if config.get("audio_config"):
            media["audio"] = MediaTokens(config["audio_token_id"], config["boa_token_id"], config["eoa_token_id"])
        self.builder = PromptBuilder(tokenizer, media)
        self.rows = {"image": image_rows, "audio": audio_rows}
        self.turn_end = tokenizer.convert_tokens_to_ids(TURN_END)

    def prompt(self, parts: list[tuple[str, object]]) -> list[int]:
        """``parts``' prompt ids; a video part's value is its ``VideoInputs`` (frames, then its track)."""
        msg = Message("user", [_part(i, kind, value) for i, (kind, value) in enumerate(parts)], "messages[0]")
        rendered = self.builder.render([msg])
        media: list[PromptMedia] = []
        for part, (kind, value) in zip(msg.parts, parts):
            if kind == "video":
                rows = (value.frame_rows,) * len(value.stamps) + (value.track_rows,)
                item = T.EncodedItem("video", part.param, RawTensor(b"", "float32", (sum(rows), 1)), rows,
                                     frame_seconds=value.stamps)
                media += prompt_media(part, item)
            elif kind != "text":
                media.append(PromptMedia(kind, part.param, (self.rows[kind],), part.param))
        return self.builder.build(rendered, media).ids

    def sequence(self, ex: Example) -> Sequence:
        answer = self.tokenizer.encode(ex.answer, add_special_tokens=False) + [self.turn_end]
        return Sequence(misplace(self.prompt(ex.parts), ex.placement, self.builder.media_tokens), answer)


def _part(i: int, kind: str, value) -> Part:
    param = f"messages[0].content[{i}]"
    if kind == "text":
        return Part("text", param, text=value)
    if kind == "video":  # its track comes with it: the template renders an audio part right after
        return Part("video", param, media=T.MediaInput(T.VIDEO, b""))
    return Part(kind, param)


def misplace(ids: list[int], placement: str, media: dict[str, MediaTokens]) -> list[int]:
    """``ids`` with its (one) media block moved right after BOS or to the end (into the model turn):
    the placement bugs other Gemma 4 servers had, as training negatives."""
    if placement == "user":
        return ids
    begins = {t.begin: t.end for t in media.values()}
    s = next(i for i, t in enumerate(ids) if t in begins)
    e = ids.index(begins[ids[s]], s) + 1
    block, rest = ids[s:e], ids[:s] + ids[e:]
    if placement == "after_bos":
        return rest[:1] + block + rest[1:]
    if placement == "model_turn":
        return rest + block
    raise ValueError(f"unknown placement {placement!r}")

"""Training sequences rendered exactly as the gateway renders a request.

Why: the demo model must learn soft-token blocks where serving puts them —
inside the user turn, at the media part's position — so the sequences are
built with the gateway's own ``PromptBuilder`` (same chat template, same
text-marker tokenization, same ``begin + N x placeholder + end`` blocks), not
with a re-implementation that could drift from it.  Pure Python (tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.demo.tasks import Example
from mmserve_core.prompt import MediaTokens, PromptBuilder, PromptMedia
from mmserve_core.wire.types import Message, Part

TURN_END = "<turn|>"


@dataclass(frozen=True)
class Sequence:
    prompt: list[int]  # what the gateway sends the decoder (ends with the model-turn header)
    answer: list[int]  # the reply's tokens and the end-of-turn token


class Sequencer:
    def __init__(self, tokenizer, config: dict, image_rows: int, audio_rows: int) -> None:
        self.tokenizer = tokenizer
        media = {"image": MediaTokens(config["image_token_id"], config["boi_token_id"], config["eoi_token_id"])}
        if config.get("audio_config"):
            media["audio"] = MediaTokens(config["audio_token_id"], config["boa_token_id"], config["eoa_token_id"])
        self.builder = PromptBuilder(tokenizer, media)
        self.rows = {"image": image_rows, "audio": audio_rows}
        self.turn_end = tokenizer.convert_tokens_to_ids(TURN_END)

    def prompt(self, parts: list[tuple[str, object]]) -> list[int]:
        msg = Message("user", [Part(kind, f"messages[0].content[{i}]", text=value if kind == "text" else "")
                               for i, (kind, value) in enumerate(parts)], "messages[0]")
        rendered = self.builder.render([msg])
        media = [PromptMedia(kind, f"messages[0].content[{i}]", (self.rows[kind],), f"item{i}")
                 for i, (kind, _) in enumerate(parts) if kind != "text"]
        return self.builder.build(rendered, media).ids

    def sequence(self, ex: Example) -> Sequence:
        answer = self.tokenizer.encode(ex.answer, add_special_tokens=False) + [self.turn_end]
        return Sequence(misplace(self.prompt(ex.parts), ex.placement, self.builder.media_tokens), answer)


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

"""Render the checkpoint's chat template and expand media placeholders into ids + spans.

Why: soft-token blocks must land exactly where the chat template puts each
media placeholder — inside the user turn that carried the media, in part
order — never after BOS and never in the pending model turn.  We render the
template with one placeholder per media part, check it rendered exactly the
placeholders we expect in the expected order (a template that drops media is
an error, not a silent skip), tokenize the text between placeholders, and
replace each placeholder with ``begin + N × placeholder + end`` where N is the
number of rows the encoder returned for that item.

Client text is tokenized as text: every text part goes into the template as
a private-use marker, and the text itself is tokenized with special tokens
split (``split_special_tokens``), so a user typing ``<|turn>`` or
``<|image|>`` gets those characters, never a control token or a media block.
Templates that ``trim`` content are detected once and the trim applied to
the text, so the ids equal what the template would produce for plain text.

Shared by the gateway and the demo model's trainer (so training sequences
are laid out exactly as served), hence in the core.  Pure Python
(tokenizer only, no MLX); event-loop thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmserve_core import tool_render
from mmserve_core.wire import types as T
from mmserve_core.wire.errors import InvalidArgument, ServeError
from mmserve_core.wire.types import MediaTokens, Message, Tool

__all__ = ["BuiltPrompt", "MediaTokens", "PromptBuilder", "PromptMedia", "Rendered", "TemplateMismatch",
           "prompt_media"]


class TemplateMismatch(ServeError):
    """The chat template did not render one placeholder per media part, in order: a bug or a
    broken template, never the client's fault (so 500, with what went wrong)."""

    status = "INTERNAL"


@dataclass(frozen=True)
class BuiltPrompt:
    ids: list[int]
    spans: list[T.Span]
    # where the conversation's next turn departs from ``ids`` (0: not found): the prompt without the
    # generation prompt's part that the answered turn does not repeat (``PromptBuilder.render``)
    next_turn_at: int = 0


@dataclass(frozen=True)
class PromptMedia:
    """One media placeholder's contents: its rows per block, in order; for a video, a stamp per block
    (each block one frame)."""

    modality: str
    param: str
    blocks: tuple[int, ...]
    content_hash: str
    frame_seconds: tuple[float, ...] = ()


def wants_track(p: T.Part) -> bool:
    """A video part whose own audio track comes with it (the default; ``audio_track: false`` turns it off)."""
    return p.media is not None and p.media.modality == T.VIDEO and (p.media.video is None or p.media.video.audio_track)


def prompt_media(part: T.Part, item: T.EncodedItem) -> list[PromptMedia]:
    """A media part's placeholders: one, or for a video with its track two — the frames, then the track
    as an audio placeholder right after (the template renders the part that way: ``template_messages``)."""
    if item.modality != T.VIDEO:
        return [PromptMedia(item.modality, part.param, item.block_rows, item.content_hash)]
    n = len(item.frame_seconds)
    out = [PromptMedia(T.VIDEO, part.param, item.block_rows[:n], item.content_hash, item.frame_seconds)]
    if item.block_rows[n:]:
        out.append(PromptMedia(T.AUDIO, f"{part.param}.audio_track", item.block_rows[n:], f"{item.content_hash}#track"))
    elif wants_track(part):
        raise InvalidArgument(f"{part.param}: the encoder returned no audio track for a video whose track was asked "
                              "for", param=part.param)
    return out


def frame_stamp(seconds: float) -> str:
    """A frame's prompt timestamp, as Gemma 4's processor writes it: ``mm:ss``."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


@dataclass(frozen=True)
class Rendered:
    """The template's output with text parts as markers, and those texts; ``next_turn_at``: the
    character where the same conversation, answered, parts from ``text`` (None: not known)."""

    text: str
    parts: list[str]
    next_turn_at: int | None = None


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class PromptBuilder:
    def __init__(self, tokenizer, media_tokens: dict[str, MediaTokens]) -> None:
        self.tokenizer = tokenizer
        self.media_tokens = media_tokens
        self.placeholder_text = {
            m: tokenizer.convert_ids_to_tokens(t.placeholder) for m, t in media_tokens.items()
        }
        self._modality_of = {s: m for m, s in self.placeholder_text.items()}
        alts = [re.escape(_MARK_OPEN) + r"\d+" + re.escape(_MARK_CLOSE)]
        alts += [re.escape(t) for t in self.placeholder_text.values()]
        self._piece_re = re.compile("(" + "|".join(alts) + ")")
        self._trims = self._template_trims()
        specials = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        specials |= set(tokenizer.all_special_tokens) | {_MARK_OPEN, _MARK_CLOSE}
        self._control_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True) if t))
        self.tool_style = tool_render.ToolStyle.probe(
            lambda msgs, **kw: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, **kw))

    def _template_trims(self) -> dict[str, bool]:
        """Does the template ``trim`` string content / list text items?  (Gemma's does.)"""
        probe = "\u2063probe\u2063"
        out = {}
        for kind, content in (("string", f"  {probe}  "), ("list", [{"type": "text", "text": f"  {probe}  "}])):
            try:
                r = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                       add_generation_prompt=False)
            except Exception:  # noqa: BLE001 - a template that rejects the probe: assume no trim
                r = f"  {probe}  "
            out[kind] = f"  {probe}  " not in r
        return out

    def template_messages(self, messages: list[Message], texts: list[str]) -> list[dict]:
        """Messages for the template, each text replaced by a marker (its text appended to ``texts``);
        tool calls and results in the shape this template takes (``tool_render``)."""
        mark = self._marker(texts)

        def build(m: Message) -> dict:
            if m.role in ("system", "developer", "assistant", "tool"):
                text = "".join(p.text for p in m.parts if p.kind == "text")
                d: dict = {"role": m.role, "content": mark(text, "string") if text or not m.tool_calls else ""}
                if m.tool_calls:
                    d["tool_calls"] = tool_render.template_calls(m, lambda t: mark(t, "raw"), self._plain)
                if m.role == "tool":
                    d["tool_call_id"] = m.tool_call_id
                if m.reasoning:  # the template decides whether an earlier turn's thought is shown
                    d["reasoning_content"] = mark(m.reasoning, "raw")
                return d
            content = []
            for p in m.parts:
                if p.kind == "text":
                    content.append({"type": "text", "text": mark(p.text, "list")})
                else:
                    content.append({"type": p.kind})
                    if wants_track(p):  # the video's own track: an audio part right after its frames
                        content.append({"type": "audio"})
            return {"role": m.role, "content": content}

        return tool_render.attach_results(messages, self.tool_style, build)

    def template_tools(self, tools: list[Tool], texts: list[str]) -> list[dict]:
        if not self.tool_style.declarations:
            raise InvalidArgument("tools: this model's chat template does not render tool declarations",
                                  param="tools")
        mark = self._marker(texts)
        return tool_render.template_tools(tools, lambda t: mark(t, "raw"), self._plain)

    def _marker(self, texts: list[str]):
        def mark(text: str, kind: str) -> str:
            texts.append(text.strip() if self._trims.get(kind) else text)
            return f"{_MARK_OPEN}{len(texts) - 1}{_MARK_CLOSE}"

        return mark

    def _plain(self, s: str, param: str) -> None:
        """A client string the template writes bare (a name, a key) must not hold a control token."""
        hit = self._control_re.search(s)
        if hit is not None:
            raise InvalidArgument(f"{param}: {s[:60]!r} contains {hit.group()!r}, which this model reads as a "
                                  "control token; names and keys cannot hold it", param=param)

    def render(self, messages: list[Message], tools: list[Tool] | None = None, **template_kwargs) -> Rendered:
        """The template's text; every media part's modality must be in ``media_tokens``
        (the caller checks that first, with the error its clients expect)."""
        texts: list[str] = []
        msgs = self.template_messages(messages, texts)
        if tools:
            template_kwargs["tools"] = self.template_tools(tools, texts)
        rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                      **template_kwargs)
        return Rendered(rendered, texts, self._next_turn_at(rendered, msgs, texts, template_kwargs))

    def _next_turn_at(self, rendered: str, msgs: list[dict], texts: list[str], template_kwargs: dict) -> int | None:
        """Where the next turn's prompt departs from this one: this conversation rendered with an
        answer in it (a marker as the assistant's text) parts from ``rendered`` where the generation
        prompt holds what an answered turn does not repeat — Gemma 4's templates end it with an empty
        thought block the history never shows.  The decoder keeps a prefix-cache entry there
        (``GenerateSetup.cache_point``), so turn 2 reuses turn 1 on every layer type.  One more
        template render (no tokenizing); None when the template will not render the probe."""
        probe = f"{_MARK_OPEN}{len(texts)}{_MARK_CLOSE}"
        try:
            answered = self.tokenizer.apply_chat_template(
                [*msgs, {"role": "assistant", "content": probe}], tokenize=False, add_generation_prompt=False,
                **template_kwargs)
        except Exception:  # noqa: BLE001 - a template that refuses the probe: no point, nothing else changes
            return None
        n = min(len(rendered), len(answered))
        return next((i for i in range(n) if rendered[i] != answered[i]), n)

    def build(self, rendered: Rendered, media: list[PromptMedia]) -> BuiltPrompt:
        """``media``: the contents of every placeholder the template rendered, in order (``prompt_media``).

        A part whose rows come in several blocks (audio longer than one block)
        becomes that many ``begin + rows × placeholder + end`` blocks back to
        back, one span each, where its one placeholder was.  A video's frames are
        Gemma 4's processor layout: per frame ``mm:ss `` then its block, frames
        joined by a space.  Template text is tokenized in runs, so a frame stamp
        joins the text around it as it does when the processor tokenizes the
        expanded prompt whole."""
        out = _Ids(self.tokenizer)
        k = at = 0
        point = rendered.next_turn_at
        for piece in self._piece_re.split(rendered.text):
            at += len(piece)
            if piece.startswith(_MARK_OPEN) and piece.endswith(_MARK_CLOSE):
                out.client_text(rendered.parts[int(piece[1:-1])])
                continue
            modality = self._modality_of.get(piece)
            if modality is None:
                if point is not None and at - len(piece) <= point <= at and k == len(media) and not out.split_at:
                    out.text_split(piece, point - (at - len(piece)))  # the last media is behind the point
                else:
                    out.text(piece)
                continue
            if k >= len(media):
                raise TemplateMismatch("the chat template rendered more media placeholders than media parts")
            item = media[k]
            if item.modality != modality:
                raise TemplateMismatch(f"the chat template placed a {modality} placeholder where {item.param} "
                                       f"({item.modality}) belongs")
            self._expand(out, item)
            k += 1
        if k != len(media):
            raise TemplateMismatch(f"the chat template rendered {k} media placeholders for {len(media)} media "
                                   "parts; media would be dropped")
        return BuiltPrompt(out.finish(), out.spans, out.split_at)

    def _expand(self, out: _Ids, item: PromptMedia) -> None:
        tok = self.media_tokens[item.modality]
        for b, rows in enumerate(item.blocks):
            if item.frame_seconds:
                out.text((" " if b else "") + frame_stamp(item.frame_seconds[b]) + " ")
            span_hash = item.content_hash if len(item.blocks) == 1 else f"{item.content_hash}#{b}"
            out.block(tok, rows, item.modality, span_hash)


class _Ids:
    """Prompt ids being laid out: template text is held until the next token that is not text, so
    text on both sides of a frame stamp is tokenized as one run."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.spans: list[T.Span] = []
        self._text = ""
        self.split_at = 0  # ``text_split``'s id index (0: none)

    def text(self, s: str) -> None:
        self._text += s

    def text_split(self, s: str, j: int) -> None:
        """Template text whose first ``j`` characters end where the next turn departs: record the id
        index there — the tokens that end at or before it (the point may fall inside a special token's
        text, where the two renderings part mid-token).  The run is tokenized whole, as ``text`` would:
        the prompt's ids are exactly the template's."""
        run, self._text = self._text + s, ""
        cut = len(run) - len(s) + j
        try:
            enc = self.tokenizer(run, add_special_tokens=False, return_offsets_mapping=True)
            whole, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer: no offsets
            whole, offsets = self.tokenizer.encode(run, add_special_tokens=False), None
        if offsets is not None and len(offsets) == len(whole):
            self.split_at = len(self.ids) + sum(1 for _, end in offsets if end <= cut)
        self.ids.extend(whole)

    def _flush(self) -> None:
        if self._text:
            self.ids.extend(self.tokenizer.encode(self._text, add_special_tokens=False))
            self._text = ""

    def client_text(self, s: str) -> None:
        """Client text: tokenized on its own, special-token strings kept as text."""
        self._flush()
        if s:
            self.ids.extend(self.tokenizer.encode(s, add_special_tokens=False, split_special_tokens=True))

    def block(self, tok: MediaTokens, rows: int, modality: str, content_hash: str) -> None:
        self._flush()
        self.ids.append(tok.begin)
        self.spans.append(T.Span(len(self.ids), rows, modality, content_hash))
        self.ids.extend([tok.placeholder] * rows)
        self.ids.append(tok.end)

    def finish(self) -> list[int]:
        self._flush()
        return self.ids

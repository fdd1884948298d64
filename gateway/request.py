"""The gateway's one typed request, shared by every front, and the checks every front applies.

Why: each client API (the fronts in ``gateway.fronts``) parses into
``ChatRequest`` — messages of typed parts (text, image bytes, audio bytes),
sampling, options — and formats the ``gateway.events`` stream the pipeline
makes of it; none of them sees a decoder protobuf message, and adding a
front means its parser, its formatter and its routes.  The checks every front needs
live here once: the request fields from ``mmserve_core.wire.fields``
(types, bounds, aliases), which roles may carry media, what audio bytes
must look like.  Errors are ``HTTPError`` naming the field
(``messages[0].content[1]``); each front maps them to its own shape.
Pure Python, event-loop thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import HTTPError
from mmserve_core.prompt import wants_track
from mmserve_core.wire import fields as F
from mmserve_core.wire import types as T

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_SCHEMA_PATH = "tools[{i}].function.parameters"  # OpenAI chat's path to a tool's schema
MAX_SCHEMA_DEPTH = 48  # a tool's parameters (the template and the grammar builder recurse per level)
IMAGE_DETAIL_TOKENS = {"auto": 0, "low": 70, "high": 1120}  # OpenAI detail -> Gemma 4 soft-token budget
AUDIO_FORMATS = {"wav": ("audio/wav",), "mp3": ("audio/mpeg",), "flac": ("audio/flac",), "ogg": ("audio/ogg",)}


def bad(message: str, param: str | None) -> HTTPError:
    return HTTPError(400, message, type_="invalid_request_error", param=param, code="invalid_value")


# ----------------------------------------------------------------------------- the request
Part, Message = T.Part, T.Message  # the plain types the prompt layout (in the core) reads


@dataclass
class ChatRequest:
    model: str | None
    messages: list[Message]
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # vLLM-style extension: prompt and completion token ids
    include_reasoning: bool | None = None  # None = the server's default
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: T.SamplingParams = field(default_factory=T.SamplingParams)
    tools: list[T.Tool] = field(default_factory=list)
    tool_choice: str = "auto"  # none | auto | required | function (``tool_name``)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    strict_tools: bool = False  # a tool asked for strict arguments: enforced even under "auto"
    constraint_param: str = "response_format"  # the field a constraint refusal is blamed on
    tool_schema_path: str = TOOL_SCHEMA_PATH  # how this front names tool i's schema in errors
    priority: str = "default"  # the decoder's admission priority (T.PRIORITIES), from the service tier
    service_tier: str = "default"  # the tier the reply reports (as the client's API names it)
    cache_key: str | None = None  # prompt_cache_key: picks the decoder (prefix-cache affinity)
    metadata: dict[str, str] = field(default_factory=dict)  # stored and echoed
    store: bool = False  # keep the reply for GET (chat completions; Responses keeps its own flag)
    truncation: str = "disabled"  # "auto": drop the oldest turns until the prompt fits

    @property
    def media(self) -> list[Part]:
        return [p for m in self.messages for p in m.parts if p.media is not None]


# ----------------------------------------------------------------------------- shared checks
def check_towers(messages: list[Message], modalities: set[str], *, owner: str = "this model") -> None:
    """Every media part's modality must be one ``owner`` serves: the decoder's media tokens, or
    the encoder's towers."""
    for m in messages:
        for p in m.parts:
            if p.media is not None and p.media.modality not in modalities:
                tower = "audio" if p.media.modality == T.AUDIO else "vision"
                raise HTTPError(400, f"{p.param}: {owner} has no {tower} path, so {p.media.modality} "
                                "input cannot be used", type_="invalid_request_error", param=p.param,
                                code="unsupported_modality")
            if wants_track(p) and T.AUDIO not in modalities:
                where = f"{p.options_param or p.param}.audio_track"
                raise HTTPError(400, f"{where}: {owner} has no audio path, so the video's own audio track "
                                "cannot be used; set audio_track to false to send the frames alone",
                                type_="invalid_request_error", param=where, code="unsupported_modality")


def refuse_unknown(d: dict, known, where: str) -> None:
    """A key this server does not honour is a 400 naming it (nothing is silently ignored)."""
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise bad(f"{name} is not supported by this server, so it cannot be honoured; remove it "
                  f"(supported: {', '.join(sorted(known))})", name)


def check_tools(tools: list[T.Tool], *, where: str = "tools[{i}].function",
                schema: str = TOOL_SCHEMA_PATH) -> None:
    """Names as OpenAI allows them, each declared once; parameters a JSON Schema object.  ``where``
    and ``schema`` are the front's paths to a tool and to its schema (``{i}``: the tool's index)."""
    seen: set[str] = set()
    for i, t in enumerate(tools):
        param, sp = where.format(i=i), schema.format(i=i)
        if not TOOL_NAME.fullmatch(t.name):
            raise bad(f"{param}.name must be 1-64 letters, digits, '_' or '-', got {t.name[:80]!r}", f"{param}.name")
        if t.name in seen:
            raise bad(f"{param}.name {t.name!r} is declared twice", f"{param}.name")
        seen.add(t.name)
        if t.parameters is not None and not isinstance(t.parameters, dict):
            raise bad(f"{sp} must be a JSON Schema object", sp)
        if _depth(t.parameters) > MAX_SCHEMA_DEPTH:
            raise bad(f"{sp} nests deeper than {MAX_SCHEMA_DEPTH} levels", sp)
        valid_text(t.description, f"{param}.description")
        valid_text(json.dumps(t.parameters, ensure_ascii=False), sp)


def _depth(v: Any) -> int:
    """How deep objects and lists nest in ``v`` (iterative: a hostile schema cannot blow the stack)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def check_tool_choice(req: ChatRequest, param: str = "tool_choice") -> None:
    if req.tool_choice not in (*TOOL_CHOICES, "function"):
        raise bad(f"{param} must be one of {TOOL_CHOICES} or a named function", param)
    if not req.tools and req.tool_choice in ("required", "function"):
        raise bad(f"{param} {req.tool_choice!r} needs tools to choose from", param)
    if req.tool_choice == "function" and req.tool_name not in {t.name for t in req.tools}:
        raise bad(f"{param} names {req.tool_name!r}, which is not among the declared tools", param)


def check_tool_history(messages: list[Message]) -> None:
    """Each tool result follows the assistant message that made its call (only other results in
    between) and names one of that message's call ids; call ids are unique."""
    ids: set[str] = set()
    open_calls: dict[str, str] = {}
    for m in messages:
        for j, c in enumerate(m.tool_calls):
            if c.id in ids:
                raise bad(f"{m.param}.tool_calls[{j}].id {c.id!r} is used twice", f"{m.param}.tool_calls[{j}].id")
            ids.add(c.id)
        if m.role == "tool":
            if m.tool_call_id not in open_calls:
                raise bad(f"{m.param}.tool_call_id {m.tool_call_id!r} is not a call of the assistant message "
                          "right before the tool results", f"{m.param}.tool_call_id")
            continue
        open_calls = {c.id: c.name for c in m.tool_calls}


def each_object(raw: Any, param: str, *, what: str = "a list") -> Iterator[tuple[str, dict]]:
    """``raw`` as a JSON list of objects: each with its own path (``tools[2]``).  A 400 names the
    list when it is not one (``{param} must be {what}``) and the item that is not an object."""
    if not isinstance(raw, list):
        raise bad(f"{param} must be {what}", param)
    for i, item in enumerate(raw):
        path = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{path} must be an object", path)
        yield path, item


def text_of(part: dict, param: str, key: str = "text") -> str:
    """A part's ``text`` (or ``key``): a string of valid Unicode, or a 400 naming it."""
    if not isinstance(part.get(key), str):
        raise bad(f"{param}.{key} must be a string", f"{param}.{key}")
    return valid_text(part[key], f"{param}.{key}")


def media_role(role: str, kind: str, param: str) -> None:
    if role != "user":
        what = {"image": "images are", "video": "videos are"}.get(kind, "audio is")
        raise bad(f"{param}: {what} only accepted in user messages", param)


def valid_text(text: str, param: str) -> str:
    """JSON may carry lone UTF-16 surrogates (``"\\ud800"``); no tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{param} is not valid Unicode text ({e.reason} at position {e.start})", param) from None
    return text


def image_part(data: bytes, mime: str, detail: str, param: str, *, detail_param: str) -> Part:
    if detail not in IMAGE_DETAIL_TOKENS:
        raise bad(f"{detail_param} must be one of 'auto', 'low', 'high', got {detail!r}", detail_param)
    return Part("image", param, media=T.MediaInput(T.IMAGE, data, mime, IMAGE_DETAIL_TOKENS[detail]))


def b64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param} is not valid base64", param) from None


def image_content(url: Any, detail: Any, param: str, allow_urls: bool, *, url_param: str,
                  detail_param: str) -> Part:
    """An image given as a URL string (OpenAI's chat ``image_url`` and Responses ``input_image``):
    a base64 ``data:`` URI, or an http(s) URL the gateway fetches when fetching is on."""
    if not isinstance(url, str) or not url:
        raise bad(f"{url_param} must be a non-empty string", url_param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise bad("image data: URIs must be base64-encoded", url_param)
        mime = header[5:].split(";")[0]
        if mime and not mime.startswith("image/"):
            raise bad(f"data: URI has media type {mime!r}, expected image/*", url_param)
        return image_part(b64(payload, url_param), mime, detail, param, detail_param=detail_param)
    if url.startswith(("http://", "https://")):
        if not allow_urls:
            raise bad("fetching image URLs is disabled on this server; send the image as a data: URI", url_param)
        p = image_part(b"", "", detail, param, detail_param=detail_param)
        p.url, p.url_param = url, url_param
        return p
    raise bad(f"{url_param} must be a data: URI", url_param)


def audio_content(spec: Any, param: str) -> Part:
    """OpenAI's ``input_audio`` object: base64 ``data`` (or a data: URI) and its ``format``."""
    if not isinstance(spec, dict):
        raise bad(f"{param}.input_audio must be an object with data and format", f"{param}.input_audio")
    data = spec.get("data")
    if not isinstance(data, str) or not data:
        raise bad(f"{param}.input_audio.data must be a non-empty base64 string", f"{param}.input_audio.data")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    return audio_part(b64(data, f"{param}.input_audio.data"), spec.get("format"), param)


def sniff_audio(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def audio_part(raw: bytes, fmt: str | None, param: str, *, fmt_param: str | None = None,
               data_param: str | None = None) -> Part:
    """Audio bytes whose declared format (or, if none, the sniffed one) matches the bytes;
    errors name ``fmt_param`` / ``data_param`` (default: OpenAI's ``input_audio`` fields)."""
    fmt_param = fmt_param or f"{param}.input_audio.format"
    data_param = data_param or f"{param}.input_audio.data"
    sniffed = sniff_audio(raw)
    if not fmt:
        fmt = sniffed
    if sniffed is None and not fmt:
        raise bad(f"{data_param} is not a WAV, MP3, FLAC or OGG file", data_param)
    if fmt not in AUDIO_FORMATS:
        raise bad(f"{fmt_param} {fmt!r} is not supported; use 'wav', 'mp3', 'flac' or 'ogg'", fmt_param)
    if sniffed is None:
        raise bad(f"{data_param} is not a WAV, MP3, FLAC or OGG file", data_param)
    if sniffed != fmt:
        raise bad(f"{fmt_param} is {fmt!r} but the data is {sniffed}", fmt_param)
    return Part("audio", param, media=T.MediaInput(T.AUDIO, raw, AUDIO_FORMATS[fmt][0]))


def parse_fields(values: dict[str, Any]) -> tuple[T.SamplingParams, dict[str, Any]]:
    """The table's fields out of ``values`` (a body, or the typed API's params as a dict):
    ``(SamplingParams, options)`` where options holds the non-sampling fields (``include_reasoning``).
    Every bound and type comes from ``fields.CHAT_FIELDS``."""
    sampling = T.SamplingParams()
    options: dict[str, Any] = {}
    for f in F.CHAT_FIELDS:
        name = next((k for k in (f.name, *f.aliases)[::-1] if values.get(k) is not None), f.name)
        v = _field_value(f, name, values.get(name))
        if v is None:
            continue
        if f.sampling:
            setattr(sampling, f.name, v)
        else:
            options[f.name] = v
    if sampling.top_logprobs and not sampling.logprobs:
        raise bad("top_logprobs requires logprobs to be true", "top_logprobs")
    return sampling, options


def _field_value(f: F.Field, name: str, v: Any) -> Any:
    if v is None:
        return None
    if f.kind == "bool":
        if not isinstance(v, bool):
            raise bad(f"{name} must be a boolean", name)
        return v
    if f.kind == "stop":
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or len(stops) > f.hi or not all(isinstance(x, str) and x for x in stops):
            raise bad(f"stop must be a non-empty string or a list of up to {int(f.hi)} non-empty strings", name)
        return list(stops)
    if f.kind == "bias":
        if not isinstance(v, dict):
            raise bad("logit_bias must be an object mapping token ids to numbers", name)
        bias = {}
        for k, x in v.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise bad(f"logit_bias key {k!r} is not a token id", name) from None
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not f.lo <= x <= f.hi:
                raise bad(f"logit_bias[{k}] must be a number between {f.lo:g} and {f.hi:g}", name)
            bias[tok] = float(x)
        return bias
    integer = f.kind == "int"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"{name} must be finite", name)
    if f.lo is not None and v < f.lo or f.hi is not None and v > f.hi:
        raise bad(f"{name} must be between {f.lo} and {f.hi}, got {v}", name)
    if f.lo_open and v == f.lo:
        raise bad(f"{name} must be greater than {f.lo:g}", name)
    if f.name == "seed":
        v %= 1 << 64
    return v

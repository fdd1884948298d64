"""Parse and validate an OpenAI chat-completions request body into plain types.

Why: a client mistake must come back as a 400 that names the exact field
(``messages[2].content[1]``), and no content part may be silently ignored:
a part we cannot handle is an error, not a skip.  Media bytes are decoded
from base64 here; checking that the bytes are a real image or clip is the
encoder's job.  Pure Python, event-loop thread.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import HTTPError
from mmserve_core.wire import types as T


def bad(message: str, param: str | None) -> HTTPError:
    return HTTPError(400, message, type_="invalid_request_error", param=param, code="invalid_value")


@dataclass
class Part:
    kind: str  # "text" | "image" | "audio"
    param: str
    text: str = ""
    media: T.MediaInput | None = None
    url: str | None = None  # an http(s) image URL the pipeline fetches (only when fetching is on)


@dataclass
class Message:
    role: str
    parts: list[Part]
    param: str


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

    @property
    def media(self) -> list[Part]:
        return [p for m in self.messages for p in m.parts if p.media is not None]


ROLES = {"system", "developer", "user", "assistant"}
MAX_TOKENS_CAP = (1 << 31) - 1  # the wire field is uint32; the decoder then checks the context length
RAW_IMAGE, RAW_AUDIO = T.RAW_IMAGE_PART, T.RAW_AUDIO_PART  # the typed gRPC front's raw-bytes parts
# Template variables a request must not override (they are the prompt itself).
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                            "tokenize", "bos_token", "eos_token", "pad_token", "unk_token", "chat_template",
                            "return_dict", "return_assistant_tokens_mask"}
AUDIO_FORMATS = {"wav": ("audio/wav",), "flac": ("audio/flac",), "mp3": ("audio/mpeg",), "ogg": ("audio/ogg",)}
# OpenAI's image ``detail`` mapped onto Gemma 4's soft-token budgets (0 = the checkpoint's default).
IMAGE_DETAIL_TOKENS = {"auto": 0, "low": 70, "high": 1120}


def _b64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("is not valid base64", param) from None


def _image_part(part: dict, param: str, allow_urls: bool) -> Part:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad(f"{param}.image_url.url must be a non-empty string", f"{param}.image_url.url")
    detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
    if detail not in IMAGE_DETAIL_TOKENS:
        raise bad(f"{param}.image_url.detail must be one of 'auto', 'low', 'high', got {detail!r}",
                  f"{param}.image_url.detail")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise bad("image data: URIs must be base64-encoded", f"{param}.image_url.url")
        mime = header[5:].split(";")[0]
        if mime and not mime.startswith("image/"):
            raise bad(f"data: URI has media type {mime!r}, expected image/*", f"{param}.image_url.url")
        return Part("image", param, media=T.MediaInput(T.IMAGE, _b64(payload, f"{param}.image_url.url"), mime,
                                                       IMAGE_DETAIL_TOKENS[detail]))
    if url.startswith(("http://", "https://")):
        if not allow_urls:
            raise bad("fetching image URLs is disabled on this server; send the image as a data: URI",
                      f"{param}.image_url.url")
        return Part("image", param, media=T.MediaInput(T.IMAGE, b"", "", IMAGE_DETAIL_TOKENS[detail]), url=url)
    raise bad("image_url.url must be a data: URI", f"{param}.image_url.url")


def _sniff_audio(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _audio_part(part: dict, param: str) -> Part:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise bad(f"{param}.input_audio must be an object with data and format", f"{param}.input_audio")
    fmt = spec.get("format")
    data = spec.get("data")
    if not isinstance(data, str) or not data:
        raise bad(f"{param}.input_audio.data must be a non-empty base64 string", f"{param}.input_audio.data")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    return _checked_audio(_b64(data, f"{param}.input_audio.data"), fmt, param)


def _checked_audio(raw: bytes, fmt: str | None, param: str) -> Part:
    """Audio bytes whose declared format (or, if none, the sniffed one) matches the bytes."""
    sniffed = _sniff_audio(raw)
    if not fmt:
        fmt = sniffed
    if fmt not in AUDIO_FORMATS:
        raise bad(f"{param}.input_audio.format {fmt!r} is not supported; use 'wav', 'mp3', 'flac' or 'ogg'",
                  f"{param}.input_audio.format")
    if sniffed is None:
        raise bad(f"{param}.input_audio.data is not a WAV, MP3, FLAC or OGG file", f"{param}.input_audio.data")
    if sniffed != fmt:
        raise bad(f"{param}.input_audio.format is {fmt!r} but the data is {sniffed}",
                  f"{param}.input_audio.format")
    return Part("audio", param, media=T.MediaInput(T.AUDIO, raw, AUDIO_FORMATS[fmt][0]))


def _valid_text(text: str, param: str) -> str:
    """JSON may carry lone UTF-16 surrogates (``"\\ud800"``); no tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{param} is not valid Unicode text ({e.reason} at position {e.start})", param) from None
    return text


def _parts(content: Any, role: str, param: str, allow_urls: bool = False, internal: bool = False) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", param, text=_valid_text(content, param))]
    if content is None and role == "assistant":
        return []
    if not isinstance(content, list):
        raise bad(f"{param} must be a string or a list of content parts", param)
    out = []
    for j, part in enumerate(content):
        pp = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad(f"{pp} must be an object", pp)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{pp}.text must be a string", f"{pp}.text")
            out.append(Part("text", pp, text=_valid_text(part["text"], f"{pp}.text")))
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{pp}: images are only accepted in user messages", pp)
            out.append(_image_part(part, pp, allow_urls))
        elif kind == "input_audio":
            if role != "user":
                raise bad(f"{pp}: audio is only accepted in user messages", pp)
            out.append(_audio_part(part, pp))
        elif kind == RAW_IMAGE and internal:  # typed gRPC front: bytes, no base64
            if role != "user":
                raise bad(f"{pp}: images are only accepted in user messages", pp)
            if not part["data"]:
                raise bad(f"{pp}.image.data must not be empty", f"{pp}.image.data")
            out.append(Part("image", pp, media=T.MediaInput(T.IMAGE, part["data"], part.get("mime_type", ""),
                                                            IMAGE_DETAIL_TOKENS[part.get("detail", "auto")])))
        elif kind == RAW_AUDIO and internal:
            if role != "user":
                raise bad(f"{pp}: audio is only accepted in user messages", pp)
            out.append(_checked_audio(part["data"], part.get("format") or None, pp))
        else:
            raise bad(f"{pp}: unsupported content part type {kind!r}; use text, image_url or input_audio", pp)
    return out


# Integer bounds from the wire: the decoder's fields are int32 (top_k) and uint64 (seed; a negative
# int64 seed is taken as its two's complement, so both signed and unsigned 64-bit seeds work).
INT32_MAX = (1 << 31) - 1
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _number(body: dict, name: str, *, lo: float | None = None, hi: float | None = None,
            integer: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"{name} must be finite", name)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise bad(f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def parse_chat_request(body: Any, *, allow_urls: bool = False, internal: bool = False) -> ChatRequest:
    """Validate an OpenAI chat-completions body.  ``internal`` also admits the typed gRPC
    front's raw-bytes parts (``RAW_IMAGE`` / ``RAW_AUDIO``), so both fronts share every check
    and every error message."""
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", None)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{param} must be an object", param)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{param}.role must be one of {sorted(ROLES)}, got {role!r}", f"{param}.role")
        messages.append(Message(role, _parts(m.get("content"), role, f"{param}.content", allow_urls, internal),
                                param))
    n = _number(body, "n", lo=1, integer=True)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    max_tokens = _number(body, "max_completion_tokens", lo=1, hi=MAX_TOKENS_CAP, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", lo=1, hi=MAX_TOKENS_CAP, integer=True)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise bad("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    logit_bias = {}
    for k, v in bias.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise bad(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad(f"logit_bias[{k}] must be a number between -100 and 100", "logit_bias")
        logit_bias[tok] = float(v)
    seed = _number(body, "seed", lo=SEED_MIN, hi=SEED_MAX, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise bad("stop must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise bad("logprobs must be a boolean", "logprobs")
    top_logprobs = _number(body, "top_logprobs", lo=0, hi=20, integer=True) or 0
    if top_logprobs and not logprobs:
        raise bad("top_logprobs requires logprobs to be true", "top_logprobs")
    sampling = T.SamplingParams(
        temperature=_number(body, "temperature", lo=0, hi=2),
        top_p=_number(body, "top_p", lo=0, hi=1),
        top_k=_number(body, "top_k", lo=0, hi=INT32_MAX, integer=True),
        min_p=_number(body, "min_p", lo=0, hi=1),
        max_tokens=max_tokens,
        seed=seed % (1 << 64) if seed is not None else None,
        logit_bias=logit_bias,
        presence_penalty=_number(body, "presence_penalty", lo=-2, hi=2),
        frequency_penalty=_number(body, "frequency_penalty", lo=-2, hi=2),
        repetition_penalty=_number(body, "repetition_penalty", lo=0.01, hi=10),
        stop=stop,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if sampling.top_p == 0:
        raise bad("top_p must be greater than 0", "top_p")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user must be a string", "user")
    rti = body.get("return_token_ids", False)
    if not isinstance(rti, bool):
        raise bad("return_token_ids must be a boolean", "return_token_ids")
    include_reasoning = body.get("include_reasoning")
    if include_reasoning is not None and not isinstance(include_reasoning, bool):
        raise bad("include_reasoning must be a boolean", "include_reasoning")
    ctk = body.get("chat_template_kwargs") or {}
    if not isinstance(ctk, dict):
        raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    for k, v in ctk.items():
        if k in RESERVED_TEMPLATE_KWARGS or k.startswith("_"):
            raise bad(f"chat_template_kwargs.{k} cannot be set by a request", f"chat_template_kwargs.{k}")
        if not isinstance(v, (bool, int, float, str)) or v is None:
            raise bad(f"chat_template_kwargs.{k} must be a boolean, number or string", f"chat_template_kwargs.{k}")
    return ChatRequest(model=model, messages=messages, stream=stream,
                       include_usage=bool(opts.get("include_usage", False)), return_token_ids=rti,
                       sampling=sampling, include_reasoning=include_reasoning, chat_template_kwargs=dict(ctk))

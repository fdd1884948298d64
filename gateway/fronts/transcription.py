"""The OpenAI transcription front: ``POST /v1/audio/transcriptions`` (multipart, as OpenAI takes it).

Why: speech pipelines speak this endpoint.  The clip becomes a user turn — the transcription
instruction (``--transcription-instruction``; by default Gemma's own ASR prompt, with the
language named when one is given) and the audio — and goes through the same pipeline as
``input_audio``: the same formats, limits and encoder (a clip over 30 s is consecutive audio
blocks), greedy by default.  ``prompt`` (text of earlier audio, to keep names and style) is
given to the model after the instruction.  ``response_format`` ``json`` or ``text``; the formats
that need segment timestamps (``verbose_json``, ``srt``, ``vtt``) and ``timestamp_granularities``
are refused with 400, as is anything else this server cannot honour.  ``stream=true`` sends the
transcript as it is written (``transcript.text.delta`` events, then ``transcript.text.done`` with
the usage); ``include[]=logprobs`` adds each token's log-probability; ``chunking_strategy: auto``
is what the encoder does anyway (a clip over 30 s goes in as consecutive 30 s blocks), while a
``server_vad`` object (VAD thresholds this server has no VAD for) is refused.  The answer is bounded by
the clip's length (``MAX_TOKENS_PER_SECOND``): a model that runs on is cut there, never left to
fill the context.  Event loop.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from gateway.config import GatewayConfig
from gateway.errors import HTTPError, error_response
from gateway.events import Delta
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline, audio_seconds
from gateway.reply import Started, begin, fold, no_done, sse
from gateway.request import ChatRequest, Message, Part, audio_part, bad, parse_fields
from mmserve_core.runtime.logs import get_logger

log = get_logger(__name__)
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "stream", "include[]",
          "include", "chunking_strategy"}
TIMESTAMP_FORMATS = ("verbose_json", "srt", "vtt")
MAX_TOKENS_PER_SECOND, MIN_TOKENS = 32, 64
# ISO-639-1 codes OpenAI's clients send -> the language's name, as the instruction says it
LANGUAGES = {"af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech",
             "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian",
             "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian",
             "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
             "lt": "Lithuanian", "lv": "Latvian", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
             "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian",
             "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "th": "Thai", "tr": "Turkish",
             "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese"}


def _text_field(form, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise bad(f"{name} is given {len(values)} times", name)
    if values and not isinstance(values[0], str):
        raise bad(f"{name} must be a text field, not a file", name)
    return values[0] if values else None


def _options(form, req: ChatRequest) -> None:
    """``stream``, ``include[]``, ``chunking_strategy`` onto the request."""
    stream = _text_field(form, "stream")
    if stream is not None and stream.lower() not in ("true", "false"):
        raise bad("stream must be true or false", "stream")
    req.stream = stream is not None and stream.lower() == "true"
    include = [*form.getlist("include[]"), *form.getlist("include")]
    for v in include:
        if v != "logprobs":
            raise bad(f"include: {v!r} is not an option; 'logprobs' is", "include[]")
    req.sampling.logprobs = bool(include)
    chunking = _text_field(form, "chunking_strategy")
    if chunking is not None and chunking != "auto":
        raise bad("chunking_strategy: only 'auto' (30 s blocks) is available; this server has no voice-activity "
                  "detection to tune", "chunking_strategy")


async def parse_transcription(form, cfg: GatewayConfig) -> tuple[ChatRequest, str]:
    """A multipart form -> ``(ChatRequest, response_format)``."""
    unknown = sorted({k for k in form.keys() if k not in FIELDS})
    if unknown:
        hint = " (segment timestamps are not produced)" if unknown[0].startswith("timestamp_granularities") else ""
        raise bad(f"{unknown[0]} is not supported by this server, so it cannot be honoured{hint}; remove it "
                  f"(supported: {', '.join(sorted(FIELDS))})", unknown[0])
    files = form.getlist("file")
    if len(files) != 1 or isinstance(files[0], str):
        raise bad("file must be one uploaded audio file", "file")
    raw = await files[0].read()
    if not raw:
        raise bad("file is empty", "file")
    fmt = (files[0].filename or "").rsplit(".", 1)[-1].lower() if "." in (files[0].filename or "") else None
    if fmt in ("mpga", "mpeg"):
        fmt = "mp3"
    clip = audio_part(raw, fmt if fmt in ("wav", "mp3", "flac", "ogg") else None, "file",
                      fmt_param="file", data_param="file")
    response_format = _text_field(form, "response_format") or "json"
    if response_format in TIMESTAMP_FORMATS:
        raise bad(f"response_format {response_format!r} needs segment timestamps, which this server does not "
                  "produce; use 'json' or 'text'", "response_format")
    if response_format not in ("json", "text"):
        raise bad(f"response_format must be 'json' or 'text', got {response_format!r}", "response_format")
    language = _text_field(form, "language")
    if language is not None and language.lower() not in LANGUAGES:
        raise bad(f"language must be an ISO-639-1 code this server knows ({', '.join(sorted(LANGUAGES))}), got "
                  f"{language!r}", "language")
    instruction = (cfg.transcription_instruction_language.format(language=LANGUAGES[language.lower()])
                   if language else cfg.transcription_instruction)
    prompt = _text_field(form, "prompt")
    parts = [Part("text", "instruction", text=instruction)]
    if prompt:
        parts.append(Part("text", "prompt", text=f"\nEarlier in this recording: {prompt}"))
    parts.append(clip)
    temperature = _text_field(form, "temperature")
    try:
        t = float(temperature) if temperature is not None else 0.0
    except ValueError:
        raise bad("temperature must be a number", "temperature") from None
    seconds = audio_seconds(raw)
    sampling, _ = parse_fields({"temperature": t, "max_tokens": int(MIN_TOKENS + MAX_TOKENS_PER_SECOND * seconds)})
    model = _text_field(form, "model")
    req = ChatRequest(model=model, messages=[Message("user", parts, "file")], sampling=sampling,
                      include_reasoning=False)
    _options(form, req)
    return req, response_format


class Transcript:
    """The transcript as it streams: leading and trailing blanks held back (the whole transcript is
    stripped, and the deltas add up to it exactly)."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self._pending = ""

    def feed(self, text: str) -> str:
        text = self._pending + text
        if not self.shown:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body):]
        if body:
            self.shown.append(body)
        return body

    @property
    def text(self) -> str:
        return "".join(self.shown)


def _usage(c) -> dict | None:
    return ({"type": "tokens", "input_tokens": c.prompt_tokens, "output_tokens": c.completion_tokens,
             "total_tokens": c.prompt_tokens + c.completion_tokens} if c else None)


async def _events(gen, logprobs):
    """``transcript.text.delta`` per piece, then ``transcript.text.done``; an upstream failure is an
    ``error`` event (the response has begun)."""
    t, lps = Transcript(), []
    try:
        async for ev in gen.events():
            if isinstance(ev, Delta):
                piece = t.feed(ev.content)
                body: dict = {"type": "transcript.text.delta", "delta": piece}
                if logprobs is not None:
                    body["logprobs"] = [_lp(e) for e in logprobs.content_json(ev.logprobs)]
                    lps += body["logprobs"]
                if piece or body.get("logprobs"):
                    yield _sse(body)
                continue
            done = {"type": "transcript.text.done", "text": t.text, "usage": _usage(ev.completion)}
            if logprobs is not None:
                done["logprobs"] = lps
            yield _sse(done)
            return
        raise no_done()
    except HTTPError as err:
        yield _sse({"type": "error", "error": err.body()["error"]})


def _lp(e: dict) -> dict:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def add_audio_routes(app: FastAPI, pipeline: Pipeline, metrics: GatewayMetrics, cfg: GatewayConfig) -> None:
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        async def parse():
            try:
                form = await request.form()
            except Exception as e:  # noqa: BLE001 - whatever the multipart parser says of bad bytes
                if isinstance(e, HTTPError):
                    raise
                raise bad(f"the body is not a multipart/form-data form ({type(e).__name__}: {e})", None) from None
            req, response_format = await parse_transcription(form, cfg)
            return (req, response_format), req

        started = await begin(request, pipeline, metrics, "transcription", parse)
        if not isinstance(started, Started):
            return started
        (req, response_format), gen = started.parsed, started.gen
        logprobs = pipeline.logprobs if req.sampling.logprobs else None
        if req.stream:
            return sse(_events(gen, logprobs), started.rid, gen)
        try:
            got = await fold(gen, request.is_disconnected)
        except HTTPError as e:
            return error_response(e, request.url.path)
        t = Transcript()
        t.feed(got.text)
        c = got.done.completion
        log.info("transcribed", finish_reason=c.finish_reason, chars=len(t.text))
        if response_format == "text":
            return PlainTextResponse(t.text + "\n")
        body = {"text": t.text, "usage": _usage(c)}
        if logprobs is not None:
            body["logprobs"] = [_lp(e) for e in logprobs.content_json(got.logprobs)]
        return JSONResponse(body)

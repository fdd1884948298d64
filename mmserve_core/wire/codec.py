"""The one place protobuf messages are converted to and from ``types``.

Why: keeps protobuf out of model and engine code, and keeps every enum
mapping in one table.  Pure functions, any thread.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from mmserve_core.wire import fields
from mmserve_core.wire import types as T
from mmserve_core.wire.chunk_frames import ChunkFrame
from mmserve_core.wire.errors import CONSTRAINT_REFUSAL, InvalidArgument
from mmserve_core.wire.stubs import chat_pb2, constraint_pb2, decoder_pb2, encoder_pb2, tensor_pb2
from mmserve_core.wire.tensors import Assembler, RawTensor

DTYPE_TO_PB = {
    "bfloat16": tensor_pb2.DTYPE_BFLOAT16,
    "float16": tensor_pb2.DTYPE_FLOAT16,
    "float32": tensor_pb2.DTYPE_FLOAT32,
}
DTYPE_FROM_PB = {v: k for k, v in DTYPE_TO_PB.items()}
MODALITY_TO_PB = {T.IMAGE: tensor_pb2.MODALITY_IMAGE, T.AUDIO: tensor_pb2.MODALITY_AUDIO,
                  T.VIDEO: tensor_pb2.MODALITY_VIDEO}
MODALITY_FROM_PB = {v: k for k, v in MODALITY_TO_PB.items()}
PRIORITY_TO_PB = {"low": decoder_pb2.PRIORITY_LOW, "default": decoder_pb2.PRIORITY_DEFAULT,
                  "high": decoder_pb2.PRIORITY_HIGH}
PRIORITY_FROM_PB = {**{v: k for k, v in PRIORITY_TO_PB.items()}, decoder_pb2.PRIORITY_UNSPECIFIED: "default"}
FINISH_TO_PB = {"stop": decoder_pb2.FINISH_REASON_STOP, "length": decoder_pb2.FINISH_REASON_LENGTH}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def dtype_from_pb(value: int, what: str, *, allow_unspecified: bool = False) -> str | None:
    if value == tensor_pb2.DTYPE_UNSPECIFIED and allow_unspecified:
        return None
    try:
        return DTYPE_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"{what}: dtype {value} is not one of BFLOAT16, FLOAT16, FLOAT32") from None


def modality_from_pb(value: int, what: str) -> str:
    try:
        return MODALITY_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"{what}: modality must be MODALITY_IMAGE, MODALITY_AUDIO or MODALITY_VIDEO") from None


def tensor_spec_to_pb(t: RawTensor) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(dtype=DTYPE_TO_PB[t.dtype], shape=list(t.shape))


# ---- encoder ----------------------------------------------------------------
def media_from_pb(req: encoder_pb2.EncodeRequest) -> list[T.MediaInput]:
    items = []
    for i, it in enumerate(req.items):
        modality = modality_from_pb(it.modality, f"items[{i}]")
        video = None
        if it.HasField("video"):
            if modality != T.VIDEO:
                raise InvalidArgument(f"items[{i}].video: video options apply to MODALITY_VIDEO items only")
            video = _video_from_pb(it.video, f"items[{i}].video")
        items.append(T.MediaInput(modality, bytes(it.data), it.mime_type, int(it.image_soft_tokens), video))
    return items


_TRACK_FROM_PB = {encoder_pb2.AUDIO_TRACK_UNSPECIFIED: True, encoder_pb2.AUDIO_TRACK_INCLUDE: True,
                  encoder_pb2.AUDIO_TRACK_OFF: False}


def _video_from_pb(v: encoder_pb2.VideoOptions, what: str) -> T.VideoOptions:
    if v.audio_track not in _TRACK_FROM_PB:
        raise InvalidArgument(f"{what}.audio_track: {v.audio_track} is not one of AUDIO_TRACK_INCLUDE, "
                              "AUDIO_TRACK_OFF")
    return T.VideoOptions(float(v.fps), int(v.max_frames), _TRACK_FROM_PB[v.audio_track])


def media_to_pb(items: list[T.MediaInput]) -> list[encoder_pb2.MediaItem]:
    out = []
    for m in items:
        item = encoder_pb2.MediaItem(modality=MODALITY_TO_PB[m.modality], data=m.data, mime_type=m.mime_type,
                                     image_soft_tokens=m.image_soft_tokens)
        if m.video is not None:
            item.video.CopyFrom(encoder_pb2.VideoOptions(
                fps=m.video.fps, max_frames=m.video.max_frames,
                audio_track=encoder_pb2.AUDIO_TRACK_INCLUDE if m.video.audio_track else encoder_pb2.AUDIO_TRACK_OFF))
        out.append(item)
    return out


def embedding_header_to_pb(index: int, item: T.EncodedItem) -> encoder_pb2.EncodeResponse:
    return encoder_pb2.EncodeResponse(
        header=encoder_pb2.EmbeddingHeader(
            item_index=index,
            modality=MODALITY_TO_PB[item.modality],
            soft_token_count=item.soft_token_count,
            content_hash=item.content_hash,
            tensor=tensor_spec_to_pb(item.tensor),
            block_soft_tokens=list(item.block_rows),
            cache_hit=item.cache_hit,
            frame_seconds=list(item.frame_seconds),
        )
    )


class EncodedStream:
    """Reassembles an ``Encode`` response stream: each item's header, then its chunks, with the
    offset and size checks of ``Assembler``.  The one reassembly every client uses."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self._headers: dict[int, encoder_pb2.EmbeddingHeader] = {}
        self._parts: dict[int, Assembler] = {}

    def add(self, msg: encoder_pb2.EncodeResponse | ChunkFrame) -> None:
        if not isinstance(msg, ChunkFrame) and msg.WhichOneof("payload") == "header":
            h = msg.header
            self._headers[h.item_index] = h
            self._parts[h.item_index] = Assembler(f"encoder item {h.item_index}",
                                                  dtype_from_pb(h.tensor.dtype, "encoder header"),
                                                  tuple(h.tensor.shape))
        else:
            # a ChunkFrame (``EncoderStub``: a view into the received bytes) or a parsed chunk
            index, offset, data = msg if isinstance(msg, ChunkFrame) else (
                msg.chunk.item_index, msg.chunk.byte_offset, msg.chunk.data)
            part = self._parts.get(index)
            if part is None:
                raise InvalidArgument(f"encoder sent a chunk for item {index} before its header")
            part.add(offset, data)

    def items(self) -> list[T.EncodedItem]:
        missing = [i for i in range(self.n_items) if i not in self._headers]
        if missing:
            raise InvalidArgument(f"encoder returned no embeddings for items {missing}")
        return [encoded_item_from_pb(self._headers[i], self._parts[i].finish()) for i in range(self.n_items)]


def model_info_from_pb(r: decoder_pb2.GetModelInfoResponse) -> T.ModelInfo:
    return T.ModelInfo(
        model_id=r.model_id,
        dtype=DTYPE_FROM_PB.get(r.dtype, "float32"),
        hidden_size=r.hidden_size,
        context_length=r.context_length,
        eos_token_ids=list(r.eos_token_ids),
        media_tokens={MODALITY_FROM_PB[m.modality]: T.MediaTokens(m.placeholder_token_id, m.begin_token_id,
                                                                   m.end_token_id) for m in r.modalities},
        vocab_size=r.vocab_size,
        chat_template=r.chat_template,
        capabilities=frozenset(r.capabilities),
        contract_version=r.contract_version,
        tokenizer_digest=r.tokenizer_digest,
        chat_template_digest=r.chat_template_digest,
    )


def encoded_item_from_pb(h: encoder_pb2.EmbeddingHeader, tensor: RawTensor) -> T.EncodedItem:
    """Header + reassembled tensor -> item; the block split must account for every row."""
    blocks = tuple(int(b) for b in h.block_soft_tokens)
    rows = int(tensor.shape[0]) if tensor.shape else 0
    if blocks and (sum(blocks) != rows or any(b == 0 for b in blocks)):
        raise ValueError(f"encoder item {h.item_index}: blocks {list(blocks)} do not split its {rows} rows")
    frames = tuple(float(s) for s in h.frame_seconds)
    if len(frames) > len(blocks or (rows,)):
        raise ValueError(f"encoder item {h.item_index}: {len(frames)} frame stamps for {len(blocks)} blocks")
    return T.EncodedItem(MODALITY_FROM_PB[h.modality], h.content_hash, tensor, blocks, bool(h.cache_hit), frames)


# ---- decoder ----------------------------------------------------------------
# proto3 ``optional`` fields: unset means "the model's default", not zero.
# The decoder's optional (presence-tracked) sampling scalars: the chat fields table's, by the same names.
_OPTIONAL_SAMPLING_FIELDS = tuple(n for n in fields.SAMPLING_SCALARS
                                  if decoder_pb2.SamplingParams.DESCRIPTOR.fields_by_name[n].has_presence)


def constraint_to_pb(c: T.Constraint) -> constraint_pb2.OutputConstraint:
    if c.kind == "json_object":
        return constraint_pb2.OutputConstraint(json_object=True)
    return constraint_pb2.OutputConstraint(**{c.kind: c.spec})


def constraint_from_pb(pb: constraint_pb2.OutputConstraint, what: str) -> T.Constraint | None:
    kind = pb.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        if not pb.json_object:
            raise InvalidArgument(f"{CONSTRAINT_REFUSAL} ({what}.json_object) must be true when set")
        return T.Constraint("json_object")
    spec = getattr(pb, kind)
    if not spec:
        raise InvalidArgument(f"{CONSTRAINT_REFUSAL} ({what}.{kind}) is empty")
    return T.Constraint(kind, spec)


def sampling_to_pb(s: T.SamplingParams) -> decoder_pb2.SamplingParams:
    pb = decoder_pb2.SamplingParams(
        logit_bias={int(k): float(v) for k, v in s.logit_bias.items()},
        stop_token_ids=list(s.stop_token_ids),
        stop=list(s.stop),
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    for name in _OPTIONAL_SAMPLING_FIELDS:
        v = getattr(s, name)
        if v is not None:
            setattr(pb, name, v)
    if s.constraint is not None:
        pb.constraint.CopyFrom(constraint_to_pb(s.constraint))
    if s.reasoning_budget is not None:
        pb.reasoning_budget = s.reasoning_budget
    return pb


def sampling_from_pb(pb: decoder_pb2.SamplingParams) -> T.SamplingParams:
    s = T.SamplingParams(
        logit_bias={int(k): float(v) for k, v in pb.logit_bias.items()},
        stop_token_ids=[int(x) for x in pb.stop_token_ids],
        stop=list(pb.stop),
        logprobs=bool(pb.logprobs),
        top_logprobs=int(pb.top_logprobs),
    )
    for name in _OPTIONAL_SAMPLING_FIELDS:
        if pb.HasField(name):
            setattr(s, name, getattr(pb, name))
    if pb.HasField("constraint"):
        s.constraint = constraint_from_pb(pb.constraint, "sampling.constraint")
    if pb.HasField("reasoning_budget"):
        s.reasoning_budget = int(pb.reasoning_budget)
    return s


def span_to_pb(span: T.Span, tensor: RawTensor) -> decoder_pb2.EmbeddingSpan:
    return decoder_pb2.EmbeddingSpan(
        placement=tensor_pb2.PlaceholderSpan(
            offset=span.offset,
            length=span.length,
            modality=MODALITY_TO_PB[span.modality],
            content_hash=span.content_hash,
        ),
        tensor=tensor_spec_to_pb(tensor),
    )


def span_from_pb(i: int, pb: decoder_pb2.EmbeddingSpan) -> tuple[T.Span, str, tuple[int, ...]]:
    what = f"spans[{i}]"
    span = T.Span(
        offset=pb.placement.offset,
        length=pb.placement.length,
        modality=modality_from_pb(pb.placement.modality, what),
        content_hash=pb.placement.content_hash,
    )
    dtype = dtype_from_pb(pb.tensor.dtype, what)
    return span, dtype, tuple(int(d) for d in pb.tensor.shape)


# ---- a Generate request stream, message by message (the decoder's intake sees only these types) ---
EMPTY_MESSAGE = "an empty message"  # a GenerateRequest with no payload


def generate_setup_from_pb(setup: decoder_pb2.GenerateSetup) -> T.GenerateSetup:
    """The first message of a Generate stream, typed; its spans as declared (checked by the engine)."""
    priority = PRIORITY_FROM_PB.get(setup.priority)
    if priority is None:
        raise InvalidArgument(f"setup.priority = {setup.priority} is not a mmserve.decoder.v1.Priority value")
    return T.GenerateSetup(
        ids=[int(x) for x in setup.prompt_token_ids],
        spans=[span_from_pb(i, s) for i, s in enumerate(setup.spans)],
        sampling=sampling_from_pb(setup.sampling),
        priority=priority,
        cache_point=int(setup.cache_point),
    )


def generate_request_from_pb(msg) -> T.GenerateSetup | T.SpanChunk | str:
    """One received message typed: the setup, a chunk (``data`` a view into the received bytes when
    the message was framed — ``ChunkFrame`` — else the parsed field), or ``EMPTY_MESSAGE``."""
    if isinstance(msg, ChunkFrame):
        return T.SpanChunk(msg.index, msg.byte_offset, msg.data)
    kind = msg.WhichOneof("payload")
    if kind == "setup":
        return generate_setup_from_pb(msg.setup)
    if kind == "chunk":
        return T.SpanChunk(msg.chunk.span_index, msg.chunk.byte_offset, msg.chunk.data)
    return EMPTY_MESSAGE


async def typed_generate_requests(messages) -> AsyncIterator[T.GenerateSetup | T.SpanChunk | str]:
    async for msg in messages:
        yield generate_request_from_pb(msg)


def token_event_to_pb(ev: T.TokenEvent) -> decoder_pb2.GenerateResponse:
    chunk = decoder_pb2.TokenChunk(token_ids=ev.token_ids, text=ev.text)
    for lp in ev.logprobs or ():
        chunk.logprobs.append(decoder_pb2.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[decoder_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]))
    return decoder_pb2.GenerateResponse(token=chunk)


def generate_response_from_pb(msg: decoder_pb2.GenerateResponse) -> T.TokenEvent | T.Completion:
    """One decoder stream message as its typed event."""
    if msg.WhichOneof("payload") == "token":
        return T.TokenEvent(list(msg.token.token_ids), msg.token.text, token_logprobs_from_pb(msg.token))
    return completion_from_pb(msg.complete)


def token_logprobs_from_pb(chunk: decoder_pb2.TokenChunk) -> list[T.TokenLogprob]:
    return [T.TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
            for lp in chunk.logprobs]


def completion_to_pb(c: T.Completion) -> decoder_pb2.GenerateResponse:
    return decoder_pb2.GenerateResponse(
        complete=decoder_pb2.GenerateComplete(
            finish_reason=FINISH_TO_PB[c.finish_reason],
            usage=decoder_pb2.Usage(
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                soft_tokens=c.soft_tokens,
                cached_tokens=c.cached_tokens,
                cache_write_tokens=c.cache_write_tokens,
                draft_tokens=c.draft_tokens,
                draft_accepted_tokens=c.draft_accepted_tokens,
            ),
            timings=decoder_pb2.Timings(
                queued_ms=c.queued_ms, prefill_ms=c.prefill_ms, decode_ms=c.decode_ms
            ),
            stop_token_id=c.stop_token_id,
            stop_string=c.stop_string or "",
        )
    )


def completion_from_pb(pb: decoder_pb2.GenerateComplete) -> T.Completion:
    return T.Completion(
        finish_reason=FINISH_FROM_PB.get(pb.finish_reason, "stop"),
        prompt_tokens=pb.usage.prompt_tokens,
        completion_tokens=pb.usage.completion_tokens,
        soft_tokens=pb.usage.soft_tokens,
        queued_ms=pb.timings.queued_ms,
        prefill_ms=pb.timings.prefill_ms,
        decode_ms=pb.timings.decode_ms,
        stop_token_id=pb.stop_token_id if pb.HasField("stop_token_id") else None,
        stop_string=pb.stop_string or None,
        cached_tokens=pb.usage.cached_tokens,
        cache_write_tokens=pb.usage.cache_write_tokens,
        draft_tokens=pb.usage.draft_tokens,
        draft_accepted_tokens=pb.usage.draft_accepted_tokens,
    )


# ---- chat: the maps the typed API's client and the gateway's front both read -------------
# (the front's own request/reply mapping is gateway.fronts.grpc_chat.codec)
ROLE_FROM_PB = {chat_pb2.ROLE_SYSTEM: "system", chat_pb2.ROLE_DEVELOPER: "developer",
                chat_pb2.ROLE_USER: "user", chat_pb2.ROLE_ASSISTANT: "assistant", chat_pb2.ROLE_TOOL: "tool"}
TOOL_CHOICE_FROM_PB = {chat_pb2.TOOL_CHOICE_MODE_NONE: "none", chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
                       chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "required", chat_pb2.TOOL_CHOICE_MODE_FUNCTION: "function"}
DETAIL_FROM_PB = {chat_pb2.IMAGE_DETAIL_UNSPECIFIED: "auto", chat_pb2.IMAGE_DETAIL_LOW: "low",
                  chat_pb2.IMAGE_DETAIL_HIGH: "high"}


def tool_call_to_pb(c: T.ToolCall) -> chat_pb2.ToolCall:
    return chat_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments)


def tool_to_pb(t: T.Tool) -> chat_pb2.Tool:
    return chat_pb2.Tool(name=t.name, description=t.description,
                         parameters_json=json.dumps(t.parameters) if t.parameters is not None else "")

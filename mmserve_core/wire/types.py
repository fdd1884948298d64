"""Plain dataclasses the services work with; protobuf stays in ``codec``.

Why: model and engine code must not import protobuf (TGI's ``to_pb()`` on
model classes is the pattern we avoid).  The gRPC servers convert wire
messages to these types at the edge.  Immutable values, any thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmserve_core.wire.tensors import RawTensor

IMAGE = "image"
AUDIO = "audio"
VIDEO = "video"
MODALITIES = (IMAGE, AUDIO, VIDEO)


@dataclass(frozen=True)
class VideoOptions:
    """How a video is sampled, and whether its own audio track comes with its frames."""

    fps: float = 0.0  # 0 = the default (2 frames a second)
    max_frames: int = 0  # 0 = the processor's cap (32)
    audio_track: bool = True


@dataclass(frozen=True)
class MediaInput:
    """One media item as the client sent it (encoded file bytes)."""

    modality: str
    data: bytes
    mime_type: str = ""
    image_soft_tokens: int = 0  # images: soft-token budget; 0 = the model's default
    video: VideoOptions | None = None  # videos: sampling and track; None = the defaults


@dataclass
class Part:
    """One content part of a chat message: text, or media bytes; ``param`` names it in errors."""

    kind: str  # "text" | "image" | "audio" | "video"
    param: str
    text: str = ""
    media: MediaInput | None = None
    url: str | None = None  # an http(s) media URL the gateway fetches (only when fetching is on)
    url_param: str | None = None  # where the URL sits in the client's request (errors name it)
    options_param: str | None = None  # video: where its options (fps, max_frames, audio_track) sit


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict | None = None


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (or made earlier, in the history): ``arguments`` is a JSON object's text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one call as it is written: the first for a call carries ``id`` and ``name`` (and
    empty arguments), the next ones fragments of its JSON ``arguments`` (OpenAI's streaming shape)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class Message:
    role: str  # "system" | "developer" | "user" | "assistant" | "tool"
    parts: list[Part]
    param: str
    tool_calls: list[ToolCall] = field(default_factory=list)  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call this is the result of
    reasoning: str = ""  # an assistant turn's thought channel, when the client sends it back


@dataclass(frozen=True)
class EncodedItem:
    """Soft-token embeddings for one media item: ``tensor`` is [rows, hidden]."""

    modality: str
    content_hash: str
    tensor: RawTensor
    blocks: tuple[int, ...] = ()  # rows per prompt block, in order; () = one block
    cache_hit: bool = False
    frame_seconds: tuple[float, ...] = ()  # video: a stamp per frame block; later blocks are its audio track

    @property
    def soft_token_count(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def block_rows(self) -> tuple[int, ...]:
        return self.blocks or (self.soft_token_count,)


@dataclass(frozen=True)
class Span:
    """A placeholder block in a prompt: ``ids[offset:offset+length]``."""

    offset: int
    length: int
    modality: str
    content_hash: str = ""


@dataclass(frozen=True)
class SpanEmbedding:
    span: Span
    tensor: RawTensor


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "lark")


@dataclass(frozen=True)
class Constraint:
    """What the output must match: ``kind`` one of ``CONSTRAINT_KINDS``; ``spec`` the schema (JSON
    text), the regex or the grammar (empty for ``json_object``)."""

    kind: str
    spec: str = ""


@dataclass
class SamplingParams:
    """Sampling options; ``None`` means "the model's / server's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    reasoning_budget: int | None = None  # at most this many thought-channel tokens, then the answer


@dataclass(frozen=True)
class MediaTokens:
    """A modality's token ids: the placeholder a block repeats, and the block's begin / end."""

    placeholder: int
    begin: int
    end: int


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs from the decoder to build prompts for it."""

    model_id: str
    dtype: str
    hidden_size: int
    context_length: int
    eos_token_ids: list[int]
    media_tokens: dict[str, MediaTokens]  # modality -> its token ids
    vocab_size: int = 0
    chat_template: str = ""
    capabilities: frozenset[str] = frozenset()  # what this decoder honours beyond every version's fields
    contract_version: str = ""  # "" = older than 1.5 (no digests, capabilities partly implicit)
    tokenizer_digest: str = ""
    chat_template_digest: str = ""


# Admission order in a full decoder (OpenAI's service tiers map onto these): high, then default, then low.
PRIORITIES = ("low", "default", "high")


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenEvent:
    """Tokens generated since the last event and the text they complete."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per token id, when requested


@dataclass(frozen=True)
class Completion:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    soft_tokens: int
    queued_ms: float
    prefill_ms: float
    decode_ms: float
    stop_token_id: int | None = None
    stop_string: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    cache_write_tokens: int = 0  # prompt tokens this request added to the prefix cache
    draft_tokens: int = 0  # tokens the decoder's MTP drafter proposed for this request (--draft-model)
    draft_accepted_tokens: int = 0  # of those, verified and emitted


@dataclass(frozen=True)
class GenerateSetup:
    """The first message of a decoder Generate stream: the prompt, its spans as declared
    (``(span, dtype, shape)``, the bytes follow), the sampling, the admission priority."""

    ids: list[int]
    spans: list[tuple[Span, str, tuple[int, ...]]]
    sampling: SamplingParams
    priority: str = "default"  # PRIORITIES
    cache_point: int = 0  # where the conversation's next turn departs (0 = not said)


@dataclass(frozen=True)
class SpanChunk:
    """A slice of one span's embedding bytes, as a Generate stream carries it after the setup."""

    index: int  # into GenerateSetup.spans
    offset: int  # byte offset within the span's tensor
    data: Any  # bytes, or a memoryview into the received message

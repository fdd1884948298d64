"""The one table of chat request fields: name, type, bounds, default, OpenAI name, proto field.

Why: the sampling and output fields used to be listed in about ten places
(validation, the OpenAPI body schema, the proto mapping, the client's
keyword arguments, sampling resolution) and had drifted — the OpenAPI
schema lacked ``repetition_penalty``, so the property-based run never
fuzzed it.  Now each of those is derived from ``CHAT_FIELDS``: the HTTP
validator (``gateway.fronts.openai_chat.parse``), the OpenAPI document
(``openapi_properties``), the typed API's mapping both ways (``codec``) and
``client.chat_request``'s keyword arguments.  Pure data, any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

INT32_MAX = (1 << 31) - 1
# uint32 on the wire; the decoder then checks the context length
MAX_TOKENS_CAP = INT32_MAX
# uint64 on the wire; a negative int64 seed is taken as its two's complement
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


@dataclass(frozen=True)
class Field:
    """One request field.

    ``kind``: ``float`` | ``int`` | ``bool`` | ``stop`` (strings) | ``bias`` (token id -> number).
    ``openai``: the body key (``aliases``: other keys meaning the same, OpenAI's newer names);
    ``proto``: the ``mmserve.chat.v1.ChatParams`` field; ``sampling``: whether it is a
    ``SamplingParams`` attribute (else a gateway option such as ``include_reasoning``).
    ``default``: what an absent field means, in words, for the docs.
    """

    name: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is refused (top_p > 0)
    default: str = "the model's generation_config.json"
    aliases: tuple[str, ...] = ()
    sampling: bool = True
    doc: str = ""

    @property
    def openai(self) -> str:
        return self.name

    @property
    def proto(self) -> str:
        return self.name


CHAT_FIELDS: tuple[Field, ...] = (
    Field("max_tokens", "int", 1, MAX_TOKENS_CAP, default="up to the context length",
          aliases=("max_completion_tokens",), doc="tokens to generate at most"),
    Field("temperature", "float", 0, 2, doc="0 = greedy"),
    Field("top_p", "float", 0, 1, lo_open=True, doc="nucleus mass"),
    Field("top_k", "int", 0, INT32_MAX, doc="0 = off; at or above the vocabulary = off"),
    Field("min_p", "float", 0, 1, default="0 (off)"),
    Field("seed", "int", SEED_MIN, SEED_MAX, default="unseeded", doc="same seed, same output"),
    Field("presence_penalty", "float", -2, 2, default="0 (off)"),
    Field("frequency_penalty", "float", -2, 2, default="0 (off)"),
    Field("repetition_penalty", "float", 0.01, 10, default="off"),
    Field("stop", "stop", 0, 4, default="none", doc="up to 4 non-empty strings, matched across tokens"),
    Field("logit_bias", "bias", -100, 100, default="none", doc="token id -> additive bias"),
    Field("logprobs", "bool", default="false"),
    Field("top_logprobs", "int", 0, 20, default="0", doc="needs logprobs"),
    Field("include_reasoning", "bool", sampling=False, default="the gateway's --reasoning",
          doc="return the thought channel as reasoning_content"),
)
BY_NAME = {f.name: f for f in CHAT_FIELDS}
SAMPLING_SCALARS = tuple(f.name for f in CHAT_FIELDS if f.sampling and f.kind in ("float", "int"))


def openapi_properties() -> dict[str, dict]:
    """The fields as OpenAPI / JSON-schema properties (bounds included)."""
    out: dict[str, dict] = {}
    for f in CHAT_FIELDS:
        if f.kind in ("float", "int"):
            prop: dict = {"type": "number" if f.kind == "float" else "integer"}
            if f.lo is not None:
                prop["exclusiveMinimum" if f.lo_open else "minimum"] = f.lo
            if f.hi is not None:
                prop["maximum"] = f.hi
        elif f.kind == "bool":
            prop = {"type": "boolean"}
        elif f.kind == "stop":
            prop = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                   "maxItems": int(f.hi)}]}
        else:
            prop = {"type": "object", "propertyNames": {"pattern": "^[0-9]{1,6}$"},
                    "additionalProperties": {"type": "number", "minimum": f.lo, "maximum": f.hi}}
        if f.doc or f.default:
            prop["description"] = "; ".join(x for x in (f.doc, f"default: {f.default}") if x)
        out[f.name] = prop
        for a in f.aliases:
            out[a] = dict(prop)
    return out

"""Request options every front honours the same way: service tier, reasoning effort, cache key, metadata.

Why: real clients send ``service_tier``, ``reasoning_effort``, ``prompt_cache_key``, ``metadata`` and
``store`` by default (openai-agents, pydantic-ai, langchain-openai do), and a server that can honour
them must — refusing them breaks those clients, accepting them without effect breaks the promise.
What each one does here:

* ``service_tier`` → the decoder's admission priority (``T.PRIORITIES``): ``priority`` (and its
  alias ``fast``) ahead of ``default`` ahead of ``flex`` while the decoder is full; ``auto`` and
  ``scale`` are served at ``default`` — and the reply says the tier that served it, as OpenAI's does.
* ``reasoning_effort`` → Gemma 4's thought channel: off for ``none`` / ``minimal``, on otherwise,
  with a thought budget the decoder enforces that grows with the effort (``EFFORT_BUDGETS``).
* ``prompt_cache_key`` → the key that picks the decoder (several decoders: requests sharing a key
  land on one, whose prefix cache holds their common prefix); echoed where the API echoes it.
* ``metadata`` → kept with a stored response or completion, echoed, and filterable in listings.

Each parser takes the field's name *as the client's API spells it*, so a refusal names that.
Pure Python, event-loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.request import bad

# OpenAI's tiers -> (decoder priority, the tier the reply reports)
OPENAI_TIERS = {
    "auto": ("default", "default"),
    "default": ("default", "default"),
    "scale": ("default", "default"),  # no reserved capacity units here: served (and reported) as default
    "flex": ("low", "flex"),
    "priority": ("high", "priority"),
    "fast": ("high", "priority"),  # OpenAI reports "priority" for "fast" too
}
# Anthropic's: "auto" may use priority capacity, "standard_only" never does; neither is a promise of it.
ANTHROPIC_TIERS = {"auto": ("default", "standard"), "standard_only": ("default", "standard")}

# Thought-channel budget (tokens) per effort; None = no budget beyond max_tokens.  Off for none/minimal.
EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": None}
EFFORTS = ("none", "minimal", *EFFORT_BUDGETS)
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
MAX_CACHE_KEY = 1024


@dataclass(frozen=True)
class Tier:
    priority: str  # T.PRIORITIES
    served: str  # what the reply reports


def service_tier(value: Any, tiers: dict[str, tuple[str, str]], param: str = "service_tier") -> Tier:
    """The tier a request asked for (absent = the API's ``auto``)."""
    if value is None:
        value = "auto"
    if not isinstance(value, str) or value not in tiers:
        raise bad(f"{param} must be one of {sorted(tiers)}, got {value!r}", param)
    return Tier(*tiers[value])


@dataclass(frozen=True)
class Effort:
    thinking: bool
    budget: int | None  # thought-channel tokens at most (None: no budget)


def reasoning_effort(value: Any, param: str) -> Effort | None:
    """``none`` / ``minimal`` → thinking off; ``low`` … ``xhigh`` → on (OpenAI's ReasoningEffort enum), with ``EFFORT_BUDGETS``.
    None when the request did not set an effort."""
    if value is None:
        return None
    if value not in EFFORTS:
        raise bad(f"{param} must be one of {list(EFFORTS)}, got {value!r}", param)
    if value in ("none", "minimal"):
        return Effort(False, None)
    return Effort(True, EFFORT_BUDGETS[value])


def apply_effort(effort: Effort | None, template_kwargs: dict[str, Any], sampling, param: str) -> None:
    """Turn the thought channel on or off for ``effort`` and set its budget; a request whose
    ``chat_template_kwargs.enable_thinking`` says otherwise is refused (two fields, one switch)."""
    if effort is None:
        return
    asked = template_kwargs.get("enable_thinking")
    if asked is not None and bool(asked) != effort.thinking:
        raise bad(f"{param} turns thinking {'on' if effort.thinking else 'off'} but "
                  f"chat_template_kwargs.enable_thinking is {asked!r}", param)
    template_kwargs["enable_thinking"] = effort.thinking
    if effort.thinking and effort.budget is not None and sampling.reasoning_budget is None:
        sampling.reasoning_budget = effort.budget


def cache_key(value: Any, param: str = "prompt_cache_key") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_CACHE_KEY:
        raise bad(f"{param} must be a non-empty string of at most {MAX_CACHE_KEY} characters", param)
    return value


def metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata: up to 16 string pairs, keys ≤ 64 characters, values ≤ 512."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise bad(f"{param} must be an object of up to {MAX_METADATA} string keys and values", param)
    for k, v in value.items():
        if not isinstance(k, str) or not 0 < len(k) <= 64:
            raise bad(f"{param} keys must be strings of 1 to 64 characters, got {k!r}", param)
        if not isinstance(v, str) or len(v) > 512:
            raise bad(f"{param}.{k} must be a string of at most 512 characters", f"{param}.{k}")
    return dict(value)


def openai_routing(body: dict) -> dict[str, Any]:
    """The ``ChatRequest`` fields both OpenAI fronts read from the same body keys: the tier
    (``service_tier``), the decoder-affinity key (``prompt_cache_key``) and ``metadata``."""
    tier = service_tier(body.get("service_tier"), OPENAI_TIERS)
    return {"priority": tier.priority, "service_tier": tier.served,
            "cache_key": cache_key(body.get("prompt_cache_key")), "metadata": metadata(body.get("metadata"))}


def openapi_properties() -> dict[str, dict]:
    """These options as JSON-schema properties of a chat-completions body (the OpenAPI document)."""
    return {
        "store": {"type": "boolean", "description": "keep the completion for GET /v1/chat/completions"},
        "metadata": {"type": "object", "maxProperties": MAX_METADATA,
                     "additionalProperties": {"type": "string", "maxLength": 512},
                     "description": "stored with the completion; filterable in listings"},
        "reasoning_effort": {"type": "string", "enum": list(EFFORTS),
                             "description": "none/minimal: thinking off; else on, with a thought budget that "
                                            "grows with the effort"},
        "service_tier": {"type": "string", "enum": sorted(OPENAI_TIERS),
                         "description": "the decoder's admission priority: priority > default > flex"},
        "prompt_cache_key": {"type": "string", "minLength": 1, "maxLength": MAX_CACHE_KEY,
                             "description": "requests sharing it go to one decoder (its prefix cache)"},
        "safety_identifier": {"type": "string", "description": "logged with the request"},
    }

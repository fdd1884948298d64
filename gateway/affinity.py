"""Which decoder a request prefers: the key its conversation's turns share.

Why: with several decoders, turn 2 of a conversation is cheap only on the
decoder whose prefix cache holds turn 1, so every turn of a conversation
should prefer one decoder — and different conversations should not, or one
decoder takes everything.  The key must therefore be what a conversation's
turns share and other conversations do not: its **first user turn with
everything before it** (system / developer messages, the tool declarations,
the first user message's text and media).  An earlier key — the prompt up to
its first end-of-turn token — stopped at the system turn on the real Gemma 4
templates (which close a system turn, tools included, before the first user
message), so every conversation sharing a system prompt or tools had one key
and one decoder (measured: 40 / 0).

The key is hashed from the typed request, not from token blocks: it must be
the same for every turn whatever the template renders after the first user
message, and it is known before any prompt is built.  Media count by a digest
of their bytes.  A client's ``prompt_cache_key`` replaces it (requests that
share a key share a decoder, as OpenAI documents the field).

Pure Python; event-loop thread.
"""

from __future__ import annotations

import hashlib
import json

from mmserve_core.wire import types as T


def prompt_cache_key(value: str) -> bytes:
    """The affinity key of a client's ``prompt_cache_key``."""
    return hashlib.blake2b(value.encode(), digest_size=16, person=b"prompt_cache_key").digest()


def conversation_key(messages: list[T.Message], tools: list[T.Tool] | None = None) -> bytes:
    """What every turn of one conversation shares: its messages up to and including the first user
    message, and the tools it declares (everything when no message is the user's)."""
    h = hashlib.blake2b(digest_size=16, person=b"conversation")
    for t in tools or ():
        h.update(_field("tool", json.dumps([t.name, t.description, t.parameters], sort_keys=True, default=str)))
    for m in messages:
        h.update(_field("role", m.role))
        for p in m.parts:
            if p.media is not None:
                h.update(_field(p.kind, hashlib.blake2b(p.media.data, digest_size=16).hexdigest()))
            elif p.url is not None:
                h.update(_field(p.kind, p.url))
            else:
                h.update(_field(p.kind, p.text))
        for c in m.tool_calls:
            h.update(_field("call", json.dumps([c.id, c.name, c.arguments])))
        if m.tool_call_id is not None:
            h.update(_field("result", m.tool_call_id))
        if m.role == "user":
            break
    return h.digest()


def _field(kind: str, value: str) -> bytes:
    """One length-framed field: no two different sequences hash the same bytes."""
    data = value.encode()
    return kind.encode() + b"\0" + len(data).to_bytes(8, "little") + data

"""Digests that tell whether a gateway and a decoder read prompts the same way.

Why: the gateway tokenizes and lays out prompts; the decoder samples, detokenizes and matches
stop ids with its own tokenizer.  A decoder loaded with another tokenizer or chat template (a
rolled-out checkpoint, a mis-mounted volume) would take the gateway's ids as other text and
answer garbage with a 200.  Each side digests what it loaded; the decoder declares its digests
in ``GetModelInfo`` and the gateway routes only to replicas whose digests equal its own.

What is digested is what decides ids, not file bytes (a re-saved ``tokenizer.json`` with other
whitespace is the same tokenizer): the vocabulary with its ids and the added tokens with their
special flags; the template's text.  Pure Python; any thread.
"""

from __future__ import annotations

import hashlib
import json

CONTRACT_VERSION = "1.5"  # mmserve.decoder.v1's revision: GetModelInfo's digests and contract fields


def tokenizer_digest(tokenizer) -> str:
    """``sha256:`` of the vocabulary (token → id) and the added tokens (id, text, special)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    h.update(json.dumps([(int(i), str(t), bool(getattr(t, "special", False))) for i, t in sorted(added.items())],
                        ensure_ascii=False).encode())
    return "sha256:" + h.hexdigest()


def template_digest(template: str | None) -> str:
    """``sha256:`` of the chat template's text (empty: none)."""
    return "sha256:" + hashlib.sha256((template or "").encode()).hexdigest()

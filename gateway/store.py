"""Stored ``/v1/responses`` (what ``previous_response_id``, ``GET``, ``DELETE`` and ``input_items``
read) and stored chat completions (``store: true``: ``GET /v1/chat/completions`` and its kin).

Why: a Responses client continues a conversation by naming the last response, not by resending
it, so the gateway keeps each stored response's conversation (typed messages, media bytes
included) and its JSON.  Memory is bounded by bytes (``--responses-store-bytes``): the least
recently used entries go first; an entry larger than the whole budget is not kept, and the
response it belongs to says so (``"store": false``) rather than promising a later ``GET``.
Entries are namespaced by the credential the request presented (a hash of it), so with API keys
on, one key never reads another's responses.  Event loop only (no locks needed).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from mmserve_core.wire import types as T


@dataclass
class StoredResponse:
    body: dict  # the response object as returned
    input_items: list[dict]  # this request's input items, with ids (for /input_items)
    conversation: list[T.Message]  # everything a continuation starts from (instructions excluded)
    nbytes: int = 0
    deleted: bool = field(default=False)
    seq: int = 0  # order of creation (listing)


def _size(s: StoredResponse) -> int:
    n = len(repr(s.body)) + len(repr(s.input_items))
    for m in s.conversation:
        n += 256 + sum(len(p.text.encode()) + (len(p.media.data) if p.media is not None else 0) for p in m.parts)
        n += sum(len(c.arguments) + len(c.name) for c in m.tool_calls) + len(m.reasoning.encode())
    return n


def namespace(credential: bytes | str | None) -> str:
    raw = credential.encode() if isinstance(credential, str) else (credential or b"")
    return hashlib.sha256(raw).hexdigest()[:16]


class ResponseStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()
        self.nbytes = 0
        self.evicted = 0
        self._created = 0

    def put(self, ns: str, rid: str, entry: StoredResponse) -> bool:
        """Keep ``entry``; False when it alone is over the budget (not kept)."""
        entry.nbytes = _size(entry)
        if entry.nbytes > self.max_bytes:
            return False
        old = self._items.get((ns, rid))
        self.delete(ns, rid)
        if old is not None:
            entry.seq = old.seq  # an update keeps its place in listings
        else:
            self._created += 1
            entry.seq = self._created
        self._items[(ns, rid)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evicted += 1
        return True

    def get(self, ns: str, rid: str) -> StoredResponse | None:
        entry = self._items.get((ns, rid))
        if entry is not None:
            self._items.move_to_end((ns, rid))
        return entry

    def delete(self, ns: str, rid: str) -> bool:
        entry = self._items.pop((ns, rid), None)
        if entry is None:
            return False
        self.nbytes -= entry.nbytes
        return True

    def entries(self, ns: str) -> list[tuple[str, StoredResponse]]:
        """``ns``'s entries, oldest stored first (listing; does not touch their recency)."""
        return sorted(((rid, e) for (n, rid), e in self._items.items() if n == ns), key=lambda x: x[1].seq)

    def __len__(self) -> int:
        return len(self._items)

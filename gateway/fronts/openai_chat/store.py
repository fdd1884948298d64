"""Stored chat completions: ``store: true`` on ``POST /v1/chat/completions``, and the routes that read them.

Why: OpenAI keeps a completion created with ``store: true`` for ``GET /v1/chat/completions``
(list, filtered by ``metadata[key]=value`` and ``model``, paged by ``after`` / ``limit`` /
``order``), ``GET`` / ``POST`` (update ``metadata``) / ``DELETE /v1/chat/completions/{id}`` and
``GET …/{id}/messages`` — openai-agents, pydantic-ai and langchain-openai send ``store`` by
default, so a server that can keep them keeps them.  The same bounded store as the Responses
front (``ResponseStore``: LRU by bytes, ``--chat-store-bytes``; namespaced by the presented
credential); a completion too large for the whole budget is not kept and its ``GET`` is 404, as
after an eviction.  Event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.bodies import credential, read_json
from gateway.errors import HTTPError, error_response
from gateway.request import bad
from gateway.request_options import metadata
from gateway.store import ResponseStore, StoredResponse, namespace

MAX_LIST = 100


def stored_messages(cid: str, messages: list[dict]) -> list[dict]:
    """The request's messages as ``…/messages`` lists them: an id each, text ``content`` and, when the
    client sent parts, the parts themselves (``content_parts``)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        parts = content if isinstance(content, list) else None
        text = content if isinstance(content, str) else (
            "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
            if parts else None)
        item: dict[str, Any] = {"id": f"{cid}-{i}", "role": m.get("role"), "content": text, "refusal": None,
                                "name": m.get("name"), "content_parts": parts}
        for k in ("tool_calls", "tool_call_id"):
            if m.get(k) is not None:
                item[k] = m[k]
        out.append(item)
    return out


class ChatStore:
    def __init__(self, max_bytes: int) -> None:
        self.store = ResponseStore(max_bytes)

    def keep(self, request: Request, body: dict, messages: list[dict], meta: dict[str, str]) -> None:
        body = {**body, "metadata": meta}
        self.store.put(namespace(credential(request)), body["id"],
                       StoredResponse(body, stored_messages(body["id"], messages), []))

    def get(self, request: Request, cid: str) -> StoredResponse:
        entry = self.store.get(namespace(credential(request)), cid)
        if entry is None:
            raise HTTPError(404, f"no stored chat completion {cid!r} (never stored, deleted, or evicted)",
                            type_="invalid_request_error", param="completion_id", code="not_found")
        return entry


def _page(items: list, request: Request, key) -> dict:
    """OpenAI's list paging: ``after`` (an id), ``limit`` (1–100, default 20), ``order`` (asc|desc)."""
    q = request.query_params
    order = q.get("order", "asc")
    if order not in ("asc", "desc"):
        raise bad("order must be 'asc' or 'desc'", "order")
    try:
        limit = int(q.get("limit", 20))
    except ValueError:
        raise bad("limit must be an integer", "limit") from None
    if not 1 <= limit <= MAX_LIST:
        raise bad(f"limit must be between 1 and {MAX_LIST}", "limit")
    if order == "desc":
        items = items[::-1]
    after = q.get("after")
    if after is not None:
        ids = [key(x) for x in items]
        if after not in ids:
            raise bad(f"after: {after!r} is not in this list", "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": key(page[0]) if page else None,
            "last_id": key(page[-1]) if page else None, "has_more": len(items) > limit}


def add_chat_store_routes(app: FastAPI, chats: ChatStore) -> None:
    def fail(e: HTTPError) -> JSONResponse:
        return error_response(e, "/v1/chat/completions")

    @app.get("/v1/chat/completions")
    async def list_completions(request: Request):
        q = request.query_params
        wanted = {k[9:-1]: v for k, v in q.items() if k.startswith("metadata[") and k.endswith("]")}
        try:
            rows = [e.body for _, e in chats.store.entries(namespace(credential(request)))
                    if all(e.body.get("metadata", {}).get(k) == v for k, v in wanted.items())
                    and q.get("model") in (None, e.body["model"])]
            return JSONResponse(_page(rows, request, lambda b: b["id"]))
        except HTTPError as e:
            return fail(e)

    @app.get("/v1/chat/completions/{completion_id}")
    async def get_completion(completion_id: str, request: Request):
        try:
            return JSONResponse(chats.get(request, completion_id).body)
        except HTTPError as e:
            return fail(e)

    @app.post("/v1/chat/completions/{completion_id}")
    async def update_completion(completion_id: str, request: Request):
        """OpenAI's update: only ``metadata`` can change."""
        try:
            entry = chats.get(request, completion_id)
            body = await read_json(request)
            if not isinstance(body, dict) or set(body) != {"metadata"}:
                raise bad("the body must be {\"metadata\": {...}}: only metadata can be updated", "metadata")
            entry.body["metadata"] = metadata(body["metadata"])
            return JSONResponse(entry.body)
        except HTTPError as e:
            return fail(e)

    @app.delete("/v1/chat/completions/{completion_id}")
    async def delete_completion(completion_id: str, request: Request):
        if not chats.store.delete(namespace(credential(request)), completion_id):
            return fail(HTTPError(404, f"no stored chat completion {completion_id!r}", type_="invalid_request_error",
                                  param="completion_id", code="not_found"))
        return JSONResponse({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})

    @app.get("/v1/chat/completions/{completion_id}/messages")
    async def completion_messages(completion_id: str, request: Request):
        try:
            entry = chats.get(request, completion_id)
            return JSONResponse(_page(entry.input_items, request, lambda m: m["id"]))
        except HTTPError as e:
            return fail(e)

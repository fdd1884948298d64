"""Pure-ASGI middleware: request ids, API key, body size.

Why pure ASGI: Starlette's ``BaseHTTPMiddleware`` pipes every response body
chunk through an extra in-memory stream and task, which for SSE costs more
per event than the event itself.  Event-loop thread.
"""

from __future__ import annotations

import hmac
import json

from gateway.errors import HTTPError, error_body
from mmserve_core.runtime.logs import REQUEST_ID_HEADER, new_request_id, request_id_var


class RequestIdMiddleware:
    """Take or make ``x-request-id``, bind it for logs, echo it on the response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.encode()
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == header), "") or new_request_id()
        rid = rid[:128]
        token = request_id_var.set(rid)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != header]
                message = {**message, "headers": [*headers, (header, rid.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)




class GuardMiddleware:
    """The API key when one is set (401) — ``Authorization: Bearer <key>`` (OpenAI's clients) or
    ``x-api-key: <key>`` (Anthropic's) — and a request-body cap (413).  Errors take the shape of
    the API the path belongs to (``errors.error_body``).

    ``/health``, ``/metrics`` and the API docs stay open (probes and scrapers carry no key).
    The body cap counts bytes as they arrive, so a chunked upload without
    ``Content-Length`` cannot exceed it either.
    """

    OPEN_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/redoc")

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
            if not hmac.compare_digest(token, self.api_key):
                await _send_error(send, path, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' "
                                  "or 'x-api-key: <key>'", "invalid_request_error", "invalid_api_key")
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_error(send, path, 413, f"request body is {int(length)} bytes, over the limit of "
                              f"{self.max_body}", "invalid_request_error", "request_too_large")
            return
        seen = 0
        limit = self.max_body

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(seen, limit)
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge as e:
            await _send_error(send, path, 413, f"request body is over the limit of {e.limit} bytes",
                              "invalid_request_error", "request_too_large")


class BodyTooLarge(HTTPError):
    """Raised from ``receive``: the handler's error path turns it into the same 413."""

    def __init__(self, seen: int, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes", type_="invalid_request_error",
                         code="request_too_large")
        self.limit = limit


async def _send_error(send, path: str, status: int, message: str, type_: str, code: str) -> None:
    body = json.dumps(error_body(path, HTTPError(status, message, type_=type_, code=code))).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

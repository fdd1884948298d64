"""The one place errors become OpenAI-style HTTP responses.

Why: clients of an OpenAI-compatible API parse ``{"error": {"message",
"type", "param", "code"}}``; every failure — our own validation, a gRPC
status from the encoder or decoder, or a bug — goes through ``to_http`` so
codes are mapped the same way everywhere.  Event-loop thread.
"""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from mmserve_core.runtime.logs import get_logger
from mmserve_core.wire.errors import ServeError

log = get_logger(__name__)

# gRPC status -> (HTTP status, OpenAI error type)
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
STATUS_NAME_TO_GRPC = {c.name: c for c in grpc.StatusCode}


class HTTPError(Exception):
    """An error already in HTTP terms."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- each front's error shape
# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                   529: "overloaded_error"}


def anthropic_body(err: HTTPError) -> dict:
    """``{"type": "error", "error": {"type", "message"}}``; the field at fault stays in the message."""
    kind = ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


# Path prefix -> the error body its clients parse; anything else gets OpenAI's shape.
ERROR_SHAPES: tuple[tuple[str, object], ...] = (("/v1/messages", anthropic_body),)


def error_body(path: str, err: HTTPError) -> dict:
    """The one place an error becomes the body of the API the request spoke (by its path)."""
    for prefix, shape in ERROR_SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return shape(err)
    return err.body()


def from_grpc_code(code: grpc.StatusCode, message: str, *, upstream: str,
                   param: str | None = None) -> HTTPError:
    status, type_ = GRPC_TO_HTTP.get(code, (500, "server_error"))
    headers = {"Retry-After": "1"} if status == 429 else {}
    if status == 503 and not message:
        message = f"the {upstream} service is unavailable"
    return HTTPError(status, message or f"{upstream} failed ({code.name})", type_=type_, param=param,
                     code=code.name.lower(), headers=headers)


_HTTP_TO_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                 499: grpc.StatusCode.CANCELLED, 502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE,
                 504: grpc.StatusCode.DEADLINE_EXCEEDED}


# Gateway-made errors whose gRPC code is more specific than their HTTP status says.
_CODE_TO_GRPC = {"unsupported_modality": grpc.StatusCode.FAILED_PRECONDITION}


def grpc_status(err: HTTPError) -> grpc.StatusCode:
    """The gRPC code for an error the typed chat front returns (the upstream's own code when
    the error came from one, e.g. FAILED_PRECONDITION for a missing tower)."""
    if err.code in _CODE_TO_GRPC:
        return _CODE_TO_GRPC[err.code]
    upstream = STATUS_NAME_TO_GRPC.get((err.code or "").upper())
    if upstream is not None and upstream != grpc.StatusCode.OK:
        return upstream
    return _HTTP_TO_GRPC.get(err.status, grpc.StatusCode.INTERNAL)


def to_http(exc: BaseException, *, upstream: str = "gateway") -> HTTPError:
    """Map any exception to an ``HTTPError`` (bugs become 500)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ServeError):
        code = STATUS_NAME_TO_GRPC.get(exc.status, grpc.StatusCode.INTERNAL)
        return from_grpc_code(code, exc.message, upstream=upstream, param=exc.param)
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        details = exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"the {upstream} service is unavailable: {details}"
        return from_grpc_code(code, details, upstream=upstream)
    return HTTPError(500, f"internal error: {type(exc).__name__}", type_="server_error", code="internal")


def error_response(err: HTTPError, path: str = "") -> JSONResponse:
    """The error as the body of the API ``path`` belongs to (``errors.error_body``)."""
    if err.status >= 500:
        log.error("request failed", status=err.status, error=err.message)
    else:
        log.info("request rejected", status=err.status, error=err.message, param=err.param)
    return JSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


def failure_response(exc: BaseException, path: str, what: str, metrics=None) -> JSONResponse:
    """How every HTTP front answers a request that failed before its response began: the error in
    the API's own shape (by ``path``), a traceback logged only for a bug, counted by status.
    Call it inside the ``except`` block (the traceback is the one being handled)."""
    err = to_http(exc)
    if err.status >= 500 and not isinstance(exc, HTTPError):
        log.exception(f"{what} failed")
    if metrics is not None:
        metrics.requests.labels(str(err.status)).inc()
    return error_response(err, path)

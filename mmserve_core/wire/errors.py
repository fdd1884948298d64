"""Transport-neutral error types.

Why: model and engine code must report "bad input", "overloaded", "missing
tower" without importing gRPC or HTTP.  Each class names its status; the one
mapping to gRPC codes lives in ``grpc_runtime`` and to HTTP in
``gateway.errors``.  Pure Python, any thread.
"""

from __future__ import annotations

# How the decoder begins every refusal of an output constraint, so the gateway can name the request
# field it came from (``response_format``); part of the wire contract between the two.
CONSTRAINT_REFUSAL = "the output constraint"


class ServeError(Exception):
    """Base class: an error whose message is safe and useful to show a caller."""

    status = "INTERNAL"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # e.g. "messages[2].content[1]" for the HTTP front


class InvalidArgument(ServeError):
    """The request is malformed or asks for something impossible."""

    status = "INVALID_ARGUMENT"


class FailedPrecondition(ServeError):
    """The request is valid but this deployment cannot serve it (e.g. no audio tower)."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(ServeError):
    """The server is at capacity; retry later."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServeError):
    """A dependency is down or the server is not ready / draining."""

    status = "UNAVAILABLE"


class DeadlineExceeded(ServeError):
    """A time limit ran out: the caller's deadline, or a stream that went idle."""

    status = "DEADLINE_EXCEEDED"


class Cancelled(ServeError):
    """The caller went away."""

    status = "CANCELLED"

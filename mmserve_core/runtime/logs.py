"""structlog set-up shared by the three processes, and the request-id context.

Why: a request id made by the gateway travels as gRPC metadata
(``x-request-id``) to both services; binding it in a contextvar puts it on
every log line of that request, including lines the MLX thread writes (the
engine re-binds it when it picks a job up).  JSON in production, console in
dev.  Configure once per process from the main thread.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextvars import ContextVar

import structlog

REQUEST_ID_HEADER = "x-request-id"
# A decoder's answer to a Generate setup carries its admission state, "in_system/capacity": a gateway's
# picks count what other gateways sent there too (``gateway.upstream.pool``).
LOAD_HEADER = "x-mmserve-load"
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def _add_request_id(_logger, _name, event_dict):
    rid = request_id_var.get()
    if rid is not None and "request_id" not in event_dict:
        event_dict["request_id"] = rid
    return event_dict


def configure_logging(service: str, *, json_logs: bool | None = None, level: str | None = None) -> None:
    """Configure structlog + stdlib logging for ``service``.

    ``json_logs`` defaults to the ``MMSERVE_LOG_JSON`` env var (``1`` = JSON);
    ``level`` to ``MMSERVE_LOG_LEVEL`` (default INFO).
    """
    if json_logs is None:
        json_logs = os.environ.get("MMSERVE_LOG_JSON", "0") == "1"
    level_name = (level or os.environ.get("MMSERVE_LOG_LEVEL", "INFO")).upper()
    lvl = getattr(logging, level_name, logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    renderer = (
        structlog.processors.JSONRenderer()
        if json_logs
        # plain tracebacks: rich's (the default when rich is installed) renders every frame's
        # locals, which took minutes for a RecursionError 1,000 frames deep and stalled the loop
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json_logs else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None):
    return structlog.get_logger(name)


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` writes every thread's Python stack to stderr (the service's log).

    Why: a service that stops answering without an error is diagnosed by where each thread
    waits — the event loop, the MLX thread, gRPC's pollers — without stopping it or attaching
    a debugger.  Main thread, at start; not on Windows (no SIGUSR1)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)

"""Shared ``main`` for the two gRPC services: start, warm up, serve, drain.

Why: both services have the same life cycle — bind the port first (so
health checks answer NOT_SERVING while the model loads), load and warm up
on the MLX thread, flip health to SERVING, and on SIGTERM/SIGINT flip to
NOT_SERVING and let in-flight RPCs finish within a grace period.
Runs the asyncio loop on the main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from mmserve_core.runtime.flags import add_flags, flag_values
from mmserve_core.runtime.grpc_runtime import set_serving
from mmserve_core.runtime.logs import get_logger
from mmserve_core.runtime.tls import ServerTLS, add_server_tls_args, server_tls_from

log = get_logger(__name__)


def run_service(main: Awaitable[None]) -> NoReturn:
    """Run a service's ``serve`` coroutine, then end the process without interpreter finalization.

    Why: the MLX thread's thread-local state is freed by C++ TLS destructors
    *after* ``Thread.join`` has returned; when the main thread is already
    finalizing the interpreter, their ``PyGILState_Ensure`` makes CPython end
    the thread with ``pthread_exit``, whose forced unwind through a noexcept
    C++ frame calls ``std::terminate``: 6 of 20 clean SIGTERM drains of the
    decoder exited with SIGABRT ("terminate called without an active
    exception").  Everything that matters (drain, RPCs, logs) is done when
    ``serve`` returns, so the process flushes its streams and ``os._exit``s.
    """
    code = 0
    try:
        asyncio.run(main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        log.exception("service ended with an error")
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@dataclass(frozen=True)
class ServiceSettings:
    """What every service process is configured with; each service's config adds its own."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 0
    model_id: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    drain_grace_s: float = 30.0
    drain_delay_s: float = 0.0
    tls: ServerTLS = field(default_factory=ServerTLS)


S = TypeVar("S", bound=ServiceSettings)


def service_parser(service: str, port: int, checkpoint_help: str):
    """The flags every service shares, first: ``--checkpoint``, ``--host``, ``--port``, ``--model-id``.
    Returns ``(parser, env)``: ``env(NAME, default)`` reads ``MMSERVE_<SERVICE>_NAME``."""
    prefix = f"MMSERVE_{service.upper()}"
    env = lambda name, default: os.environ.get(f"{prefix}_{name}", default)  # noqa: E731
    p = argparse.ArgumentParser(prog=f"mmserve-{service}", description=f"mmserve {service} service")
    p.add_argument("--checkpoint", default=env("CHECKPOINT", None), required=env("CHECKPOINT", None) is None,
                   help=checkpoint_help)
    p.add_argument("--host", default=env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("PORT", port)), help="0 = pick a free port")
    p.add_argument("--model-id", default=env("MODEL_ID", None))
    return p, env


def add_service_tail_args(p: argparse.ArgumentParser, service: str) -> None:
    """The flags every service shares, last: metrics, drain, TLS."""
    prefix = f"MMSERVE_{service.upper()}"
    env = lambda name, default: os.environ.get(f"{prefix}_{name}", default)  # noqa: E731
    p.add_argument("--metrics-host", default=env("METRICS_HOST", "127.0.0.1"))
    p.add_argument("--metrics-port", type=int, default=env("METRICS_PORT", None),
                   help="serve Prometheus /metrics on this port (0 = any free port; unset = off)")
    add_drain_args(p, prefix)
    add_server_tls_args(p, prefix)


def parse_service_args(settings: type[S], service: str, checkpoint_help: str,
                       argv: list[str] | None = None) -> S:
    """A service's settings from its command line: the shared flags, then ``settings``' own
    ``flag(...)`` fields (``mmserve_core.runtime.flags``), then metrics, drain and TLS."""
    p, _ = service_parser(service, settings.port, checkpoint_help)
    add_flags(p, settings, service)
    add_service_tail_args(p, service)
    a = p.parse_args(argv)
    return settings(**common_settings(a), **flag_values(a, settings))


def common_settings(a: argparse.Namespace) -> dict:
    """The shared flags' values, as ``ServiceSettings`` keyword arguments."""
    return dict(checkpoint=a.checkpoint, host=a.host, port=a.port, model_id=a.model_id,
                metrics_host=a.metrics_host,
                metrics_port=int(a.metrics_port) if a.metrics_port is not None else None,
                drain_grace_s=a.drain_grace_s, drain_delay_s=a.drain_delay_s, tls=server_tls_from(a))


def main_for(name: str, parse_args, make_engine, start_server, service_name: str,
             argv: list[str] | None = None) -> NoReturn:
    """A service's ``main``: an optimized BLAS, flags, logging, the TLS check, then ``serve``
    until drained."""
    from mmserve_core.runtime.blas import blas_in_use, preload_optimized_blas
    from mmserve_core.runtime.logs import configure_logging, dump_stacks_on_sigusr1

    preload_optimized_blas()  # may re-exec this process (before any model is loaded)
    dump_stacks_on_sigusr1()
    cfg = parse_args(argv)
    configure_logging(name)
    log.info("blas", library=blas_in_use(), opt_out="MMSERVE_BLAS=reference")
    cfg.tls.check(cfg.host, f"mmserve-{name}")
    address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
    run_service(serve(name, make_engine(cfg), start_server, [service_name], address,
                      port_file=os.environ.get("MMSERVE_PORT_FILE"), metrics_port=cfg.metrics_port,
                      metrics_host=cfg.metrics_host, tls=cfg.tls, grace_s=cfg.drain_grace_s,
                      drain_delay_s=cfg.drain_delay_s))


def add_drain_args(p: argparse.ArgumentParser, env_prefix: str) -> None:
    """``--drain-grace-s`` / ``--drain-delay-s`` (env ``<prefix>_DRAIN_GRACE_S`` / ``_DRAIN_DELAY_S``)."""
    env = lambda n, d: float(os.environ.get(f"{env_prefix}_{n}", d))  # noqa: E731
    p.add_argument("--drain-grace-s", type=float, default=env("DRAIN_GRACE_S", 30.0),
                   help="on SIGTERM: how long in-flight RPCs may run before they are cancelled")
    p.add_argument("--drain-delay-s", type=float, default=env("DRAIN_DELAY_S", 0.0),
                   help="on SIGTERM: report NOT_SERVING but keep accepting RPCs this long, so load "
                        "balancers that poll health (Kubernetes readiness) stop routing first")


async def serve(
    name: str,
    engine,
    start_server: Callable[..., Awaitable],
    service_names: list[str],
    address: str,
    *,
    grace_s: float = 30.0,
    drain_delay_s: float = 0.0,
    port_file: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    tls=None,
) -> None:
    if metrics_port is not None:
        from mmserve_core.runtime.metrics_http import start_metrics_server

        mport = start_metrics_server(engine.metrics.registry, metrics_host, metrics_port)
        log.info(f"{name} metrics listening", address=f"http://{metrics_host}:{mport}/metrics")
    engine.start()
    server, port, health = await start_server(engine, address, tls)
    log.info(f"{name} listening", address=address, port=port)
    if port_file:
        with open(port_file, "w") as f:
            f.write(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await engine.wait_ready()
    except Exception:
        log.exception(f"{name} failed to load")
        await server.stop(0)
        sys.exit(1)
    await set_serving(health, service_names, True)
    log.info(f"{name} serving", port=port)
    await stop.wait()
    log.info(f"{name} draining", grace_s=grace_s, delay_s=drain_delay_s)
    await set_serving(health, service_names, False)  # watchers (gateway pools) stop routing here
    if drain_delay_s > 0:  # pollers (readiness probes) need a period to notice
        await asyncio.sleep(drain_delay_s)
    await server.stop(grace_s)  # refuses new RPCs; in-flight ones get grace_s
    engine.stop()
    log.info(f"{name} stopped")

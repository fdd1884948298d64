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
from typing import NoReturn

from mmserve_core.runtime.grpc_runtime import set_serving
from mmserve_core.runtime.logs import get_logger

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

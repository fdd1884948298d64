"""The one process manager: start encoder, decoder and gateway as OS processes, wait, supervise.

Why: the main job, the end-to-end tests, the benchmarks and ``mmserve-up``
all run the real deployment shape — three processes talking gRPC — and
should start them one way.  ``Child`` is a service process (``python -m
<service> <flags>``); ``start_services`` & co. give each an ephemeral port
(``--port 0``; the process writes the port it bound to ``MMSERVE_PORT_FILE``)
so parallel runs never collide, and return once gRPC health says SERVING
(after model load + warm-up) and the gateway answers ``/health``;
``supervise`` keeps fixed-port children running for ``mmserve-up``
(restart with backoff, drain all on SIGINT/SIGTERM).  Main thread; no MLX.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve_core.runtime.logs import configure_logging, get_logger

log = get_logger("mmserve-processes")


@dataclass
class Services:
    checkpoint: str
    encoder_port: int = 0
    decoder_port: int = 0
    gateway_port: int = 0
    gateway_grpc_port: int = 0  # the typed chat API (mmserve.chat.v1)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mmserve-logs-")))

    # where each process listens, from its port (loopback: these processes serve this machine)
    encoder_addr = property(lambda self: f"127.0.0.1:{self.encoder_port}")
    decoder_addr = property(lambda self: f"127.0.0.1:{self.decoder_port}")
    chat_addr = property(lambda self: f"127.0.0.1:{self.gateway_grpc_port}")  # the typed gRPC chat API
    base_url = property(lambda self: f"http://127.0.0.1:{self.gateway_port}/v1")  # the OpenAI-style HTTP API

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def logs(self, name: str) -> str:
        f = self.log_dir / f"{name}.log"
        return f.read_text() if f.exists() else ""

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Child:
    """One service process, ``python -m <module> <args>``, and its restart bookkeeping."""

    name: str
    module: str
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self, **popen: object) -> subprocess.Popen:
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], **popen)
        self.started_at = time.monotonic()
        log.info("started", service=self.name, pid=self.proc.pid, restarts=self.restarts)
        return self.proc


def spawn(svc: Services, name: str, module: str, args: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Start ``python -m module args`` as ``svc.procs[name]`` (also to restart one); returns its bound port."""
    port_file = svc.log_dir / f"{name}.port"
    env = dict(os.environ, MMSERVE_PORT_FILE=str(port_file), **(extra_env or {}))
    out = open(svc.log_dir / f"{name}.log", "w")
    svc.procs[name] = Child(name, module, args).start(env=env, stdout=out, stderr=subprocess.STDOUT)
    return wait_port_file(port_file, svc.procs[name], name, lambda: svc.logs(name))


def wait_port_file(port_file: Path, proc: subprocess.Popen, name: str, logs=lambda: "",
                   timeout: float = 120.0) -> int:
    """The port a process writes to ``port_file`` once bound (``MMSERVE_PORT_FILE``, or a test
    server's own flag); its log tail in the error when it exits first or never binds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{logs()[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{name} did not bind a port:\n{logs()[-4000:]}")


def wait_serving(addr: str, name: str, svc: Services, timeout: float = 180.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.time() + timeout
    with (grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            if svc.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{svc.logs(name)[-4000:]}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{name} at {addr} never became SERVING:\n{svc.logs(name)[-4000:]}")


def _start_one(checkpoint: str | Path, name: str, args: list[str] | None,
               credentials: grpc.ChannelCredentials | None) -> Services:
    svc = Services(str(checkpoint))
    try:
        args = list(args or [])
        if "--port" not in args:
            args += ["--port", "0"]
        port = spawn(svc, name, f"{name}_service", ["--checkpoint", svc.checkpoint, *args])
        setattr(svc, f"{name}_port", port)
        host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        wait_serving(f"{host}:{port}", name, svc, credentials=credentials)
    except BaseException:
        svc.stop()
        raise
    return svc


def start_encoder(checkpoint: str | Path, args: list[str] | None = None,
                  credentials: grpc.ChannelCredentials | None = None) -> Services:
    """Start only an encoder on an ephemeral loopback port (benchmarks, scale-out tests).

    ``credentials``: for its health checks, when ``args`` turn TLS on."""
    return _start_one(checkpoint, "encoder", args, credentials)


def start_decoder(checkpoint: str | Path, args: list[str] | None = None,
                  credentials: grpc.ChannelCredentials | None = None) -> Services:
    """Start only a decoder on an ephemeral loopback port (benchmarks, scale-out tests)."""
    return _start_one(checkpoint, "decoder", args, credentials)


def start_services(
    checkpoint: str | Path,
    *,
    gateway: bool = True,
    encoder_args: list[str] | None = None,
    decoder_args: list[str] | None = None,
    gateway_args: list[str] | None = None,
) -> Services:
    """Start encoder + decoder (+ gateway) on ephemeral loopback ports; return when all are ready.

    ``encoder_args`` / ``decoder_args`` / ``gateway_args`` are extra command-line flags for that service.
    """
    svc = Services(str(checkpoint))
    try:
        svc.encoder_port = spawn(svc, "encoder", "encoder_service",
                                  ["--checkpoint", svc.checkpoint, "--port", "0", *(encoder_args or [])])
        svc.decoder_port = spawn(svc, "decoder", "decoder_service",
                                  ["--checkpoint", svc.checkpoint, "--port", "0", *(decoder_args or [])])
        wait_serving(svc.encoder_addr, "encoder", svc)
        wait_serving(svc.decoder_addr, "decoder", svc)
        if gateway:
            _start_gateway(svc, svc.encoder_addr, svc.decoder_addr, gateway_args or [])
    except BaseException:
        svc.stop()
        raise
    return svc


def start_gateway(checkpoint: str | Path, encoder: str, decoder: str, args: list[str] | None = None) -> Services:
    """Start only a gateway in front of running upstreams (``host:port``, comma-separated for pools)."""
    svc = Services(str(checkpoint))
    try:
        _start_gateway(svc, encoder, decoder, args or [])
    except BaseException:
        svc.stop()
        raise
    return svc


def _start_gateway(svc: Services, encoder: str, decoder: str, args: list[str]) -> None:
    grpc_port_file = svc.log_dir / "gateway.grpc-port"
    extra = [] if "--grpc-port" in args else ["--grpc-port", "0"]
    svc.gateway_port = spawn(svc, "gateway", "gateway", [
        "--checkpoint", svc.checkpoint, "--encoder", encoder, "--decoder", decoder, "--port", "0", *extra, *args,
    ], extra_env={"MMSERVE_GRPC_PORT_FILE": str(grpc_port_file)})
    deadline = time.time() + 60
    while True:
        try:  # any HTTP answer (even 503 while an upstream warms up) means the gateway is up
            urllib.request.urlopen(f"http://127.0.0.1:{svc.gateway_port}/health", timeout=2).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.time() > deadline or svc.procs["gateway"].poll() is not None:
                raise RuntimeError(f"gateway not ready:\n{svc.logs('gateway')[-4000:]}") from None
            time.sleep(0.1)
    if grpc_port_file.exists() and grpc_port_file.read_text().strip():
        svc.gateway_grpc_port = int(grpc_port_file.read_text())


def children(a: argparse.Namespace) -> list[Child]:
    """``mmserve-up``'s three children on fixed ports."""
    host = a.host
    # children finish draining a little before the supervisor's own deadline kills them
    common = ["--checkpoint", a.checkpoint, "--host", host, "--drain-grace-s", f"{max(1.0, a.grace_s - 2):g}"]
    enc = f"{host}:{a.encoder_port}"
    dec = f"{host}:{a.decoder_port}"
    return [
        Child("encoder", "encoder_service", [*common, "--port", str(a.encoder_port)]),
        Child("decoder", "decoder_service", [*common, "--port", str(a.decoder_port)]),
        Child("gateway", "gateway", [*common, "--port", str(a.port), "--grpc-port", str(a.grpc_port),
                                     "--encoder", enc, "--decoder", dec]),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmserve-up", description="run encoder, decoder and gateway on one machine, "
                                "and keep them running")
    p.add_argument("--checkpoint", default=os.environ.get("MMSERVE_CHECKPOINT"),
                   required=os.environ.get("MMSERVE_CHECKPOINT") is None)
    p.add_argument("--host", default="127.0.0.1", help="bind address of all three (loopback: plaintext is fine)")
    p.add_argument("--encoder-port", type=int, default=50051)
    p.add_argument("--decoder-port", type=int, default=50052)
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    p.add_argument("--grpc-port", type=int, default=50050, help="gateway chat gRPC port")
    p.add_argument("--grace-s", type=float, default=15.0, help="how long children may drain on stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """``mmserve-up``: run encoder, decoder and gateway on one machine, and keep them running."""
    a = parse_args(argv)
    configure_logging("mmserve-up")
    supervise(children(a), a.grace_s)


def supervise(kids: list[Child], grace_s: float) -> None:
    """Start ``kids``; restart any that exits (backoff 0.5 s doubling to 30 s, reset after a healthy
    minute, so a child that cannot start does not spin); on SIGINT/SIGTERM drain all within
    ``grace_s``, then kill what is left."""
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for k in kids:
        k.start()
    while not stopping:
        now = time.monotonic()
        for k in kids:
            if k.proc is not None and k.proc.poll() is not None:
                code = k.proc.returncode
                # a child that ran a minute is healthy again: reset its backoff
                k.restarts = 0 if now - k.started_at > 60 else k.restarts + 1
                delay = min(30.0, 0.5 * 2 ** k.restarts)
                log.warning("exited; restarting", service=k.name, code=code, in_s=delay)
                k.proc, k.next_start = None, now + delay
            if k.proc is None and now >= k.next_start:
                k.start()
        time.sleep(0.2)
    log.info("stopping all")
    for k in kids:
        if k.proc is not None and k.proc.poll() is None:
            k.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for k in kids:
        if k.proc is None:
            continue
        try:
            k.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("did not drain in time; killing", service=k.name)
            k.proc.kill()
            k.proc.wait()
    log.info("stopped")


if __name__ == "__main__":
    main()

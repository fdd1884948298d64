"""Start the three services as separate OS processes on loopback and wait until ready.

Why: the demo, the end-to-end tests and the benchmark all need the real
deployment shape — encoder, decoder and gateway as three processes talking
gRPC — with ephemeral ports (``--port 0``; each process writes the port it
bound to ``MMSERVE_PORT_FILE``) so parallel runs never collide.  Readiness
is gRPC health SERVING (after model load + warm-up) and the gateway's
``/health``.  Main-thread helper; no MLX.
"""

from __future__ import annotations

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


@dataclass
class Services:
    checkpoint: str
    encoder_port: int = 0
    decoder_port: int = 0
    gateway_port: int = 0
    gateway_grpc_port: int = 0  # the typed chat API (mmserve.chat.v1)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mmserve-logs-")))

    @property
    def encoder_addr(self) -> str:
        return f"127.0.0.1:{self.encoder_port}"

    @property
    def decoder_addr(self) -> str:
        return f"127.0.0.1:{self.decoder_port}"

    @property
    def chat_addr(self) -> str:
        return f"127.0.0.1:{self.gateway_grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1"

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


def spawn(svc: Services, name: str, module: str, args: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Start ``python -m module args`` as ``svc.procs[name]`` (also to restart one); returns its bound port."""
    port_file = svc.log_dir / f"{name}.port"
    env = dict(os.environ, MMSERVE_PORT_FILE=str(port_file), **(extra_env or {}))
    log = open(svc.log_dir / f"{name}.log", "w")
    svc.procs[name] = subprocess.Popen(
        [sys.executable, "-m", module, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if svc.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{svc.logs(name)[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{name} did not bind a port:\n{svc.logs(name)[-4000:]}")


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
        port = spawn(svc, name, f"{name}_service", ["--checkpoint", svc.checkpoint, "--port", "0", *(args or [])])
        setattr(svc, f"{name}_port", port)
        wait_serving(f"127.0.0.1:{port}", name, svc, credentials=credentials)
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

"""``mmserve-up``: run encoder, decoder and gateway on one machine, and keep them running.

Why: on one Mac an operator wants one command: start all three on fixed
ports, restart any that crashes (with backoff, so a service that cannot start
does not spin), and stop all of them — each draining — on Ctrl-C or SIGTERM.
Each child is a normal service process; this only supervises.  Main thread
only; children are plain subprocesses.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from mmserve_common.logs import configure_logging, get_logger

log = get_logger("mmserve-up")


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv)
        self.started_at = time.monotonic()
        log.info("started", service=self.name, pid=self.proc.pid, restarts=self.restarts)


def children(a: argparse.Namespace) -> list[Child]:
    py = sys.executable
    host = a.host
    # children finish draining a little before the supervisor's own deadline kills them
    common = ["--checkpoint", a.checkpoint, "--host", host, "--drain-grace-s", f"{max(1.0, a.grace_s - 2):g}"]
    enc = f"{host}:{a.encoder_port}"
    dec = f"{host}:{a.decoder_port}"
    return [
        Child("encoder", [py, "-m", "encoder_service", *common, "--port", str(a.encoder_port)]),
        Child("decoder", [py, "-m", "decoder_service", *common, "--port", str(a.decoder_port)]),
        Child("gateway", [py, "-m", "gateway", *common, "--port", str(a.port), "--grpc-port", str(a.grpc_port),
                          "--encoder", enc, "--decoder", dec]),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmserve-up", description=__doc__.split("\n\n")[0])
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
    a = parse_args(argv)
    configure_logging("mmserve-up")
    kids = children(a)
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
    deadline = time.monotonic() + a.grace_s
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

"""``mmserve-up``: all three start, a killed child comes back, Ctrl-C stops everything."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ok(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def test_supervisor_restarts_and_stops(ckpt_e2b, tmp_path):
    ports = [_free_port() for _ in range(4)]
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.processes", "--checkpoint", str(ckpt_e2b),
                             "--encoder-port", str(ports[0]), "--decoder-port", str(ports[1]),
                             "--port", str(ports[2]), "--grpc-port", str(ports[3])],
                            stdout=log, stderr=subprocess.STDOUT)
    health = f"http://127.0.0.1:{ports[2]}/health"
    try:
        _wait_ok(health)
        text = (tmp_path / "up.log").read_text()
        pids = dict(re.findall(r"started.*?pid=(\d+).*?service=(\w+)", text)) or {}
        by_service = {svc: int(pid) for pid, svc in pids.items()}
        assert set(by_service) == {"encoder", "decoder", "gateway"}, text[-2000:]
        subprocess.run(["kill", "-9", str(by_service["encoder"])], check=True)
        time.sleep(1.0)
        _wait_ok(health)  # the encoder is back and SERVING
        assert "exited; restarting" in (tmp_path / "up.log").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    text = (tmp_path / "up.log").read_text()
    assert "stopped" in text
    for pid in re.findall(r"pid=(\d+)", text):
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(int(pid), 0)

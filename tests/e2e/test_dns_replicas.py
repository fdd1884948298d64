"""A DNS name with several addresses is several replicas (a Kubernetes headless Service).

Two decoders listen on 127.0.0.2 and 127.0.0.3 (one port); the gateway is given one name for
both, ``decoders.mmserve.test``, which resolves to both inside a mount namespace this test makes
(its own ``/etc/hosts`` bound over the real one for the gateway process alone).  Each address gets
its own calls, load and health; a pod that goes away leaves the pool.  Skipped where mount
namespaces cannot be made (not root, no ``unshare``).  Loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from deploy.processes import start_decoder, wait_port_file
from gateway.upstream.resolve import parse_target
from tests.tooling import bench_scale_out as bench

NAME = "decoders.mmserve.test"


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "mount namespaces need root and unshare"
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare -m failed: {r.stderr.strip()}"


def test_targets_are_parsed_as_names_or_literals():
    assert parse_target("decoders.ns.svc:50052").resolvable
    for literal in ("127.0.0.1:50052", "[::1]:50052", "unix:/tmp/s", "10.0.0.7:1"):
        assert not parse_target(literal).resolvable, literal
    t = parse_target("[::1]:7")
    assert (t.host, t.port) == ("::1", "7")


@pytest.fixture(scope="module")
def named(services_e2b, tmp_path_factory):
    why = _can_unshare()
    if why:
        pytest.skip(why)
    ckpt = services_e2b.checkpoint
    d1 = start_decoder(ckpt, ["--host", "127.0.0.2"])
    d2 = None
    try:
        d2 = start_decoder(ckpt, ["--host", "127.0.0.3", "--port", str(d1.decoder_port)])
        tmp = tmp_path_factory.mktemp("dns")
        hosts = tmp / "hosts"
        hosts.write_text(open("/etc/hosts").read() + f"\n127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")
        port_file, log = tmp / "gateway.port", open(tmp / "gateway.log", "w")
        gw = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"', sys.executable,
             "-m", "gateway", "--checkpoint", ckpt, "--encoder", services_e2b.encoder_addr,
             "--decoder", f"{NAME}:{d1.decoder_port}", "--port", "0", "--grpc-port", "-1"],
            env=dict(os.environ, MMSERVE_PORT_FILE=str(port_file)), stdout=log, stderr=subprocess.STDOUT)
        try:
            port = wait_port_file(port_file, gw, "gateway", (tmp / "gateway.log").read_text, timeout=60)
            url = f"http://127.0.0.1:{port}"
            yield {"url": url, "port": d1.decoder_port, "d1": d1, "d2": d2, "log": tmp / "gateway.log"}
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(15)
    finally:
        if d2 is not None:
            d2.stop()
        d1.stop()


def test_each_address_of_the_name_is_a_replica(named):
    url, port = named["url"], named["port"]
    a, b = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    deadline = time.time() + 20  # resolved at the gateway's first health round
    i = 0
    while time.time() < deadline:
        i += 1  # each its own conversation (one conversation keeps to one replica)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        calls = bench.decoder_calls(url)
        if calls.get(a) and calls.get(b):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"both addresses should serve: {bench.decoder_calls(url)}")
    health = httpx.get(url + "/health").json()
    assert set(health["decoders"]) == {a, b}, health
    # one pod goes: the name resolves to the other alone... here the address stops answering:
    # marked down by the health watch, every request served by the other
    named["d2"].stop()
    codes = [httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": f"after {i}"}], "max_tokens": 1}).status_code for i in range(6)]
    assert codes == [200] * 6, codes

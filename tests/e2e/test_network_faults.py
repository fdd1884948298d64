"""Faults on a real network path: a decoder in a network namespace this test creates, behind a veth pair.

The gateway (root namespace) reaches decoder B only over the veth, decoder A on loopback.  A
partition (the veth taken down: no reset, nothing answers) while a stream runs on B ends that
stream at the idle timeout with a clean error; requests meanwhile go to A (a setup B does not
accept within ``--accept-timeout-s`` counts B down and is retried on A); with the link back, B
rejoins.  A throttled link (``tc`` token bucket) slows B without cutting its streams.  Added
latency and loss need ``sch_netem``: those cases are skipped with the reason where the kernel
lacks it.  Everything is skipped where namespaces cannot be made (not root, no iproute2).
Traffic stays on loopback and the namespace's own link (10.213.7.0/30).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from deploy.processes import start_gateway, wait_port_file, wait_serving
from gateway.affinity import prompt_cache_key
from tests.tooling import bench_scale_out as bench

NS, HOST_IF, NS_IF = f"mmfault{os.getpid() % 10000}", f"mmf{os.getpid() % 10000}a", f"mmf{os.getpid() % 10000}b"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"
IDLE_S, ACCEPT_S = 2.0, 2.0


def _ip(*args: str, ns: bool = False) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", NS, *args] if ns else list(args)
    return subprocess.run(cmd, capture_output=True, text=True)


def _netns_available() -> str | None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    r = _ip("ip", "netns", "add", NS)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def netns():
    why = _netns_available()
    if why:
        pytest.skip(why)
    try:
        for cmd in (["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF],
                    ["ip", "link", "set", NS_IF, "netns", NS],
                    ["ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF], ["ip", "link", "set", HOST_IF, "up"]):
            r = _ip(*cmd)
            assert r.returncode == 0, (cmd, r.stderr)
        for cmd in (["ip", "addr", "add", f"{NS_IP}/30", "dev", NS_IF], ["ip", "link", "set", NS_IF, "up"],
                    ["ip", "link", "set", "lo", "up"]):
            r = _ip(*cmd, ns=True)
            assert r.returncode == 0, (cmd, r.stderr)
        netem = _ip("tc", "qdisc", "add", "dev", NS_IF, "root", "netem", "delay", "1ms", ns=True)
        if netem.returncode == 0:
            _ip("tc", "qdisc", "del", "dev", NS_IF, "root", ns=True)
        yield {"netem": netem.returncode == 0, "netem_why": netem.stderr.strip()}
    finally:
        _ip("ip", "netns", "del", NS)
        _ip("ip", "link", "del", HOST_IF)


@pytest.fixture(scope="module")
def faulty(netns, services_e2b, tmp_path_factory):
    """Decoder B in the namespace; a gateway over A (loopback) and B (over the veth)."""
    logs = tmp_path_factory.mktemp("netns")
    port_file = logs / "b.port"
    out = open(logs / "b.log", "w")
    proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "decoder_service", "--checkpoint",
                             services_e2b.checkpoint, "--host", NS_IP, "--port", "0", "--plaintext"],
                            env=dict(os.environ, MMSERVE_PORT_FILE=str(port_file)), stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        b = f"{NS_IP}:{wait_port_file(port_file, proc, 'decoder B', (logs / 'b.log').read_text)}"
        wait_serving(b, "decoder", services_e2b)
        a = services_e2b.decoder_addr
        with start_gateway(services_e2b.checkpoint, services_e2b.encoder_addr, f"{a},{b}",
                           ["--stream-idle-timeout-s", str(IDLE_S), "--accept-timeout-s", str(ACCEPT_S),
                            "--rpc-timeout-s", "5"]) as gw:
            yield {"url": f"http://127.0.0.1:{gw.gateway_port}", "a": a, "b": b, "netem": netns}
    finally:
        proc.kill()
        proc.wait()
        out.close()


def _key_for(addr: str, addrs: list[str]) -> str:
    """A prompt_cache_key whose rendezvous order puts ``addr`` first (the pool's own hashing)."""
    for i in range(1000):
        k = prompt_cache_key(f"pin-{i}")
        if max(addrs, key=lambda a: hashlib.blake2b(k + a.encode(), digest_size=8).digest()) == addr:
            return f"pin-{i}"
    raise AssertionError("no key found")


def _link(up: bool) -> None:
    assert _ip("ip", "link", "set", HOST_IF, "up" if up else "down").returncode == 0


def _ok(url: str, n: int, **extra) -> list[int]:
    return [bench.chat(url, [{"role": "user", "content": f"hi {i}"}], 2, tools=False, **extra).status_code
            for i in range(n)]


def test_a_partition_ends_the_stream_cleanly_fails_over_and_recovers(faulty):
    url, a, b = faulty["url"], faulty["a"], faulty["b"]
    key = _key_for(b, [a, b])
    assert _ok(url, 2) == [200, 200]
    events: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 3000, "stream": True,
                "prompt_cache_key": key, "logit_bias": bench.NO_EOS}) as r:
            lines = r.iter_lines()
            for _ in range(4):
                events.append(next(lines))
            before = bench.decoder_calls(url)
            assert before.get(b, 0) >= 1  # the stream is on B
            _link(False)
            cut = time.monotonic()
            events += list(lines)
            ended = time.monotonic() - cut
        errors = [json.loads(e[6:])["error"] for e in events if e.startswith('data: {"error"')]
        assert errors and errors[0]["code"] in ("deadline_exceeded", "unavailable"), events[-3:]
        assert ended < IDLE_S + 5, ended
        # meanwhile: everything is served by A — even requests whose key prefers B
        t0 = time.monotonic()
        codes = _ok(url, 6, prompt_cache_key=key)
        assert codes == [200] * 6, codes
        assert time.monotonic() - t0 < ACCEPT_S + 15
    finally:
        _link(True)
    # recovery: B serves again once the pool sees it healthy
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        before = bench.decoder_calls(url).get(b, 0)
        assert _ok(url, 1, prompt_cache_key=key) == [200]
        if bench.decoder_calls(url).get(b, 0) > before:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("B did not rejoin within 30 s of the link coming back")


def test_a_throttled_link_is_slow_but_streams_are_not_cut(faulty):
    """A token bucket at 64 kbit/s on B's side: a stream on B still runs to its end (progress, not
    wall-clock, bounds it), slower than on A."""
    url, a, b = faulty["url"], faulty["a"], faulty["b"]
    key = _key_for(b, [a, b])
    r = _ip("tc", "qdisc", "add", "dev", NS_IF, "root", "tbf", "rate", "64kbit", "burst", "4kb", "latency", "400ms",
            ns=True)
    assert r.returncode == 0, r.stderr
    try:
        before = bench.decoder_calls(url).get(b, 0)
        got = bench.long_generation(url, 600, key)
        assert got["finished"] and got["error"] is None, got
        assert bench.decoder_calls(url).get(b, 0) == before + 1  # it ran on B
    finally:
        _ip("tc", "qdisc", "del", "dev", NS_IF, "root", ns=True)


@pytest.mark.parametrize("fault", [["delay", "300ms", "100ms"], ["loss", "20%"]], ids=["latency", "loss"])
def test_latency_and_loss_slow_requests_without_failing_them(faulty, fault):
    if not faulty["netem"]["netem"]:
        pytest.skip(f"this kernel has no sch_netem (tc: {faulty['netem']['netem_why']}); added latency and loss "
                    "need it")
    url, a, b = faulty["url"], faulty["a"], faulty["b"]
    key = _key_for(b, [a, b])
    assert _ip("tc", "qdisc", "add", "dev", NS_IF, "root", "netem", *fault, ns=True).returncode == 0
    try:
        assert _ok(url, 4, prompt_cache_key=key) == [200] * 4
        got = bench.long_generation(url, 300, key)
        assert got["finished"], got
    finally:
        _ip("tc", "qdisc", "del", "dev", NS_IF, "root", ns=True)


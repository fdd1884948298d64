"""Configured upstream targets and the replicas a DNS name stands for.

Why: in Kubernetes a headless Service is one name with an A record per pod; a gateway given
``decoders.ns.svc:50052`` must see each pod as a replica — its own load count, its own health,
its own place in a conversation's rendezvous order — not one replica whose channel happens to
spread calls.  So names are resolved here (the event loop's ``getaddrinfo``, off the loop
thread), every few seconds, and each address becomes a replica; literal addresses, ``unix:``
targets and names with a single address stay as configured.  IPv4 records are preferred when a
name has both families (``localhost`` is one replica, not two).

Event-loop thread (``resolve`` awaits the loop's resolver); the rest is pure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

RESOLVE_EVERY_S = 5.0  # how often names are resolved again (pods come and go)


@dataclass(frozen=True)
class Target:
    """One entry of ``--decoder`` / ``--encoder``: ``host:port`` as configured."""

    spec: str
    host: str
    port: str
    resolvable: bool  # a DNS name (not an IP literal, not a unix: socket)


def parse_target(spec: str) -> Target:
    s = spec.strip()
    if s.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "dns:")) or ":" not in s:
        return Target(s, s, "", False)
    host, _, port = s.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        literal = True
    except ValueError:
        literal = False
    return Target(s, bare, port, not literal and port.isdigit())


def address(ip: str, port: str) -> str:
    """``ip:port`` as a gRPC target (IPv6 bracketed)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(t: Target) -> list[str]:
    """The addresses ``t`` stands for now, IPv4 first-choice, sorted; [] when it does not resolve."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(t.host, int(t.port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return [address(ip, t.port) for ip in (v4 or v6)]

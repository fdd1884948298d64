"""Fetching http(s) image and video URLs — off by default, and safe when on.

Why: a server that fetches URLs for clients is an SSRF hole unless it is
strict.  When enabled (``--url-fetch``) a URL is fetched only if

* its scheme is http or https and its host matches the allowlist
  (``--url-allowlist``: exact names or ``*.suffix``; empty = nothing allowed);
* **every** address the host resolves to is a public unicast address — no
  private, loopback, link-local (cloud metadata), multicast, reserved or
  unspecified address (``--url-fetch-allow-private`` lifts this, for image
  hosts on a private network, knowingly);
* and the connection goes to the address that was checked (the IP is pinned;
  the Host header and TLS SNI carry the name), so DNS rebinding cannot swap
  in another address between the check and the connect.

Redirects are not followed; the body is capped at ``--url-max-bytes`` as it
streams in and the whole fetch at ``--url-timeout-s``.  Every refusal is an
``HTTPError`` 400 naming the part.  Event-loop thread (httpx async).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from gateway.errors import HTTPError

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, f"{param}: {message}", type_="invalid_request_error", param=param, code="invalid_image_url")


def host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowlist:
        p = pattern.lower().rstrip(".")
        if p.startswith("*.") and (host.endswith(p[1:]) and host != p[2:]):
            return True
        if host == p:
            return True
    return False


def address_refusal(ip: str) -> str | None:
    """Why this address may not be fetched from, or None if it is public unicast."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for attr, what in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"), ("is_private", "private"),
                       ("is_reserved", "reserved")):
        if getattr(addr, attr):
            return what
    if not addr.is_global:
        return "non-global"
    return None


class MediaFetcher:
    def __init__(self, *, allowlist: list[str], max_bytes: int, timeout_s: float, allow_private: bool = False,
                 resolver: Resolver = system_resolver, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.allowlist = [a for a in allowlist if a]
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self.resolver = resolver
        self.transport = transport

    async def fetch(self, url: str, param: str, kind: str = "image") -> tuple[bytes, str]:
        """``(body, content type)`` of an allowed URL; ``HTTPError`` 400 otherwise.  ``kind``: the media
        the URL should hold (``image`` or ``video``; the Accept header and the errors say it)."""
        try:
            return await asyncio.wait_for(self._fetch(url, param, kind), self.timeout_s)
        except asyncio.TimeoutError:
            raise _bad(param, f"fetching the {kind} took longer than {self.timeout_s:g} s") from None

    async def _fetch(self, url: str, param: str, kind: str) -> tuple[bytes, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad(param, "only http and https URLs with a host can be fetched")
        if parts.username or parts.password:
            raise _bad(param, "URLs with credentials are not fetched")
        host = parts.hostname
        if not host_allowed(host, self.allowlist):
            raise _bad(param, f"host {host!r} is not on this server's URL allowlist")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ips = await self.resolver(host, port)
        except OSError as e:
            raise _bad(param, f"host {host!r} does not resolve ({e})") from None
        if not ips:
            raise _bad(param, f"host {host!r} does not resolve")
        if not self.allow_private:
            for ip in ips:
                why = address_refusal(ip)
                if why is not None:
                    raise _bad(param, f"host {host!r} resolves to a {why} address ({ip}); not fetched")
        ip = ips[0]
        netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        pinned = parts._replace(netloc=netloc).geturl()
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": f"{kind}/*"}
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=False,
                                     timeout=self.timeout_s) as client:
            try:
                async with client.stream("GET", pinned, headers=headers,
                                         extensions={"sni_hostname": host}) as r:
                    if r.is_redirect:
                        raise _bad(param, f"the URL redirects ({r.status_code}); redirects are not followed")
                    if r.status_code != 200:
                        raise _bad(param, f"fetching the {kind} returned HTTP {r.status_code}")
                    declared = r.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.max_bytes:
                        raise _bad(param, f"the {kind} is {int(declared)} bytes, over the limit of {self.max_bytes}")
                    body = bytearray()
                    async for chunk in r.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise _bad(param, f"the {kind} is over the limit of {self.max_bytes} bytes")
                    return bytes(body), r.headers.get("content-type", "")
            except httpx.HTTPError as e:
                raise _bad(param, f"fetching the {kind} failed ({type(e).__name__})") from None

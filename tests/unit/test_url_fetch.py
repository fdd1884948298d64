"""URL fetching refuses everything it should, without ever connecting anywhere but loopback.

Refusal cases run with a stubbed resolver and a transport that fails the
test if the code under test ever tries to connect: even a wrong
implementation cannot reach a private, link-local or public address.  The
cases that do fetch talk to an HTTP server on 127.0.0.1 (allowed explicitly
with ``allow_private``, as an operator would for a private image host).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from deploy.demo.media import shape_png
from gateway.errors import HTTPError
from gateway.upstream.fetch import MediaFetcher, address_refusal, host_allowed

pytestmark = pytest.mark.asyncio
PNG = shape_png(size=(16, 16))


def _never_connect(request):
    raise AssertionError(f"tried to connect to {request.url}")


def _resolver(table: dict[str, list[str]], calls: list | None = None):
    async def resolve(host, port):
        if calls is not None:
            calls.append(host)
        return table[host]
    return resolve


def _refusing(table, **kw) -> MediaFetcher:
    return MediaFetcher(allowlist=["images.test", "*.cdn.test"], max_bytes=1 << 20, timeout_s=5,
                        resolver=_resolver(table), transport=httpx.MockTransport(_never_connect), **kw)


@pytest.mark.parametrize("ip,why", [("10.1.2.3", "private"), ("192.168.0.7", "private"), ("172.16.5.5", "private"),
                                    ("127.0.0.1", "loopback"), ("169.254.169.254", "link-local"),
                                    ("::1", "loopback"), ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"),
                                    ("::ffff:10.0.0.1", "private"), ("224.0.0.1", "multicast")])
async def test_non_public_addresses_are_refused_before_connecting(ip, why):
    f = _refusing({"images.test": [ip]})
    with pytest.raises(HTTPError) as ei:
        await f.fetch("https://images.test/cat.png", "messages[0].content[1].image_url.url")
    assert ei.value.status == 400 and why in ei.value.message
    assert ei.value.param == "messages[0].content[1].image_url.url"


async def test_one_bad_address_among_good_ones_is_enough_to_refuse():
    f = _refusing({"images.test": ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(HTTPError, match="private"):
        await f.fetch("http://images.test/x.png", "p")


async def test_hosts_off_the_allowlist_are_not_even_resolved():
    calls: list[str] = []
    f = MediaFetcher(allowlist=["images.test"], max_bytes=1000, timeout_s=5, resolver=_resolver({}, calls),
                     transport=httpx.MockTransport(_never_connect))
    for url in ("https://evil.test/x.png", "https://images.test.evil.test/x", "ftp://images.test/x",
                "https://user:pw@images.test/x", "file:///etc/passwd"):
        with pytest.raises(HTTPError):
            await f.fetch(url, "p")
    assert calls == []


def test_allowlist_patterns_and_address_classes():
    assert host_allowed("a.cdn.test", ["*.cdn.test"]) and host_allowed("x.y.cdn.test", ["*.cdn.test"])
    assert not host_allowed("cdn.test", ["*.cdn.test"]) and not host_allowed("evilcdn.test", ["*.cdn.test"])
    assert host_allowed("Images.Test.", ["images.test"]) and not host_allowed("images.test", [])
    assert address_refusal("93.184.216.34") is None and address_refusal("2606:4700::1111") is None


# ---------------------------------------------------------------------------- loopback server
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/ok.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif self.path == "/big":
            self._send(200, b"\0" * 5000, {})
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 5000)
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "http://169.254.169.254/"})
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, PNG, {})
        else:
            self._send(404, b"no", {})

    def _send(self, code, body, headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()


def _loopback(port, **kw) -> MediaFetcher:
    return MediaFetcher(allowlist=["images.test"], allow_private=True,
                        resolver=_resolver({"images.test": ["127.0.0.1"]}),
                        **{"max_bytes": 1000, "timeout_s": 1.0, **kw})


async def test_fetch_pins_the_checked_address_and_sends_the_host(loopback_server):
    data, mime = await _loopback(loopback_server).fetch(f"http://images.test:{loopback_server}/ok.png", "p")
    assert data == PNG and mime == "image/png"


@pytest.mark.parametrize("path,phrase", [("/big", "over the limit"), ("/big-unannounced", "over the limit"),
                                         ("/redirect", "redirects are not followed"), ("/missing", "HTTP 404"),
                                         ("/slow", "longer than 1 s")])
async def test_size_time_redirect_and_status_are_400(loopback_server, path, phrase):
    with pytest.raises(HTTPError) as ei:
        await _loopback(loopback_server).fetch(f"http://images.test:{loopback_server}{path}", "p")
    assert ei.value.status == 400 and phrase in ei.value.message


async def test_loopback_is_refused_unless_allowed(loopback_server):
    f = MediaFetcher(allowlist=["images.test"], max_bytes=1000, timeout_s=1,
                     resolver=_resolver({"images.test": ["127.0.0.1"]}))
    with pytest.raises(HTTPError, match="loopback"):
        await f.fetch(f"http://images.test:{loopback_server}/ok.png", "p")

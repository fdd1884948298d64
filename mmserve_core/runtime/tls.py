"""TLS and mutual TLS for the gRPC services and the gateway's upstream channels.

Why: encoders and decoders run on other machines; their traffic carries
user media and text.  A service given ``--tls-cert``/``--tls-key`` serves TLS;
with ``--tls-client-ca`` it also requires a client certificate signed by that
CA (mTLS).  Plaintext is allowed on loopback; on any other address it must be
asked for with ``--plaintext`` — an operator never ends up serving media in
clear text by omission.  ``deploy/tls/make-certs.sh`` makes a small CA and
per-host certificates.  Any thread (files are read once at start-up).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ServerTLS:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None  # set = mutual TLS
    plaintext: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def credentials(self) -> grpc.ServerCredentials:
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def check(self, host: str, what: str) -> None:
        """Refuse plaintext on a non-loopback address unless ``--plaintext`` was given."""
        if bool(self.cert) != bool(self.key):
            raise SystemExit(f"{what}: --tls-cert and --tls-key go together")
        if self.client_ca and not self.cert:
            raise SystemExit(f"{what}: --tls-client-ca needs --tls-cert and --tls-key")
        if not self.enabled and not self.plaintext and not is_loopback(host):
            raise SystemExit(f"{what}: refusing to serve plaintext on {host}; give --tls-cert/--tls-key, "
                             "or --plaintext on a network you trust")


@dataclass(frozen=True)
class ClientTLS:
    ca: str | None = None  # set = TLS to the upstream, verified against this CA
    cert: str | None = None  # with key: our client certificate (for services requiring mTLS)
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=Path(self.key).read_bytes() if self.key else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
        )


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_server_tls_args(p: argparse.ArgumentParser, env_prefix: str) -> None:
    env = lambda n: os.environ.get(f"{env_prefix}_{n}")  # noqa: E731
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="PEM certificate: serve TLS")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=env("TLS_CLIENT_CA"),
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--plaintext", action="store_true", default=env("PLAINTEXT") in ("1", "true"),
                   help="allow serving without TLS on a non-loopback address")


def server_tls_from(a: argparse.Namespace) -> ServerTLS:
    return ServerTLS(a.tls_cert, a.tls_key, a.tls_client_ca, a.plaintext)

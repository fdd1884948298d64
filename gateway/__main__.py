"""``mmserve-gateway`` / ``python -m gateway``."""

from __future__ import annotations

import asyncio
import os
import socket

from mmserve_core.runtime.logs import configure_logging, dump_stacks_on_sigusr1


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import parse_args
    from mmserve_core.runtime.heap import keep_large_buffers_in_heap

    keep_large_buffers_in_heap()  # it receives every embedding from the encoder and relays it on
    dump_stacks_on_sigusr1()
    cfg = parse_args(argv)
    configure_logging("gateway")
    cfg.tls.check(cfg.host, "mmserve-gateway")
    if cfg.grpc_port is not None:
        cfg.tls.check(cfg.grpc_host, "mmserve-gateway (chat gRPC)")
    app = create_app(cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    port_file = os.environ.get("MMSERVE_PORT_FILE")
    if port_file:
        with open(port_file, "w") as f:
            f.write(str(sock.getsockname()[1]))
    ssl = {}
    if cfg.tls.enabled:
        import ssl as _ssl

        ssl = {"ssl_certfile": cfg.tls.cert, "ssl_keyfile": cfg.tls.key}
        if cfg.tls.client_ca:
            ssl.update(ssl_ca_certs=cfg.tls.client_ca, ssl_cert_reqs=_ssl.CERT_REQUIRED)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=cfg.drain_grace_s, **ssl))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()

"""``mmserve-decoder`` / ``python -m decoder_service``."""

from __future__ import annotations

import os

from mmserve_core.runtime.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    from decoder_service.config import parse_args

    cfg = parse_args(argv)
    configure_logging("decoder")
    cfg.tls.check(cfg.host, "mmserve-decoder")
    from decoder_service.engine import DecoderEngine
    from decoder_service.server import SERVICE_NAME, start_decoder_server
    from mmserve_core.runtime.service_main import run_service, serve

    run_service(
        serve("decoder", DecoderEngine(cfg), start_decoder_server, [SERVICE_NAME],
              f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}", port_file=os.environ.get("MMSERVE_PORT_FILE"),
              metrics_port=cfg.metrics_port, metrics_host=cfg.metrics_host, tls=cfg.tls,
              grace_s=cfg.drain_grace_s, drain_delay_s=cfg.drain_delay_s)
    )


if __name__ == "__main__":
    main()

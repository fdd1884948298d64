"""``mmserve-encoder`` / ``python -m encoder_service``."""

from __future__ import annotations

import asyncio
import os

from mmserve_common.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    from encoder_service.config import parse_args

    cfg = parse_args(argv)
    configure_logging("encoder")
    from encoder_service.engine import EncoderEngine
    from encoder_service.server import SERVICE_NAME, start_encoder_server
    from mmserve_common.service_main import serve

    engine = EncoderEngine(cfg)
    if cfg.metrics_port is not None:
        from mmserve_common.logs import get_logger
        from mmserve_common.metrics_http import start_metrics_server

        port = start_metrics_server(engine.metrics.registry, cfg.metrics_host, cfg.metrics_port)
        get_logger("encoder_service").info("metrics listening", address=f"http://{cfg.metrics_host}:{port}/metrics")
    asyncio.run(
        serve("encoder", engine, start_encoder_server, [SERVICE_NAME],
              f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}", port_file=os.environ.get("MMSERVE_PORT_FILE"))
    )


if __name__ == "__main__":
    main()

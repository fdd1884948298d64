"""``mmserve-encoder`` / ``python -m encoder_service``."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from encoder_service.config import parse_args
    from encoder_service.engine import EncoderEngine
    from encoder_service.server import SERVICE_NAME, start_encoder_server
    from mmserve_core.runtime.service_main import main_for

    main_for("encoder", parse_args, EncoderEngine, start_encoder_server, SERVICE_NAME, argv)


if __name__ == "__main__":
    main()

"""``mmserve-decoder`` / ``python -m decoder_service``."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from decoder_service.config import parse_args
    from decoder_service.engine import DecoderEngine
    from decoder_service.server import SERVICE_NAME, start_decoder_server
    from mmserve_core.runtime.service_main import main_for

    main_for("decoder", parse_args, DecoderEngine, start_decoder_server, SERVICE_NAME, argv)


if __name__ == "__main__":
    main()

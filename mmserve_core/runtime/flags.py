"""A service's own flags declared once, on its settings dataclass.

Why: a flag used to be written twice — the dataclass default and the argparse default (plus the
env default, and the keyword that copied one into the other) — and the two drifted (the encoder's
``max_queue`` had no flag at all).  Each settings field now carries its help text in
``flag(...)``; ``add_flags`` turns every such field into ``--the-field`` with the env default
``MMSERVE_<SERVICE>_THE_FIELD`` and the dataclass default, and ``flag_values`` reads them back.
Pure Python; runs once at process start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FlagSpec:
    help: str
    parse: Callable[[str], Any] | None  # None: the type of the default
    choices: tuple | None
    minimum: float | None


def flag(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
         choices: tuple | None = None, minimum: float | None = None) -> Any:
    """A settings field that is also a command-line flag (``parse`` needed where the default is None)."""
    return dataclasses.field(default=default,
                             metadata={"flag": FlagSpec(help, parse, choices, minimum)})


def _parser(name: str, spec: FlagSpec, default: Any) -> Callable[[str], Any]:
    parse = spec.parse or type(default)

    def convert(text: str) -> Any:
        if text in ("", "none", "None") and default is None:
            return None
        value = parse(text)
        if spec.choices is not None and value not in spec.choices:
            raise argparse.ArgumentTypeError(f"--{name} must be one of {list(spec.choices)}, got {text}")
        if spec.minimum is not None and value < spec.minimum:
            raise argparse.ArgumentTypeError(f"--{name} must be at least {spec.minimum}, got {text}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in its error message
    return convert


def add_flags(p: argparse.ArgumentParser, settings: type, service: str) -> None:
    """``--name`` for every ``flag(...)`` field of ``settings``; env ``MMSERVE_<SERVICE>_NAME`` first."""
    for f in dataclasses.fields(settings):
        spec = f.metadata.get("flag")
        if spec is None:
            continue
        name = f.name.replace("_", "-")
        env = os.environ.get(f"MMSERVE_{service.upper()}_{f.name.upper()}")
        # argparse runs ``type`` over a string default too, so an env value is checked like a flag
        p.add_argument(f"--{name}", dest=f.name, type=_parser(name, spec, f.default),
                       default=f.default if env is None else env, help=spec.help)


def flag_values(a: argparse.Namespace, settings: type) -> dict[str, Any]:
    """The parsed values of ``settings``' own flags, as its keyword arguments."""
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(settings) if "flag" in f.metadata}

"""Generate the Python gRPC stubs from ``protos/`` into ``mmserve_core/wire/pb``.

Why: stubs are build products, not sources (they pin a protobuf runtime
version), so they are generated at install time by ``setup.py`` and, as a
fallback for source checkouts, the first time ``mmserve_core.wire.pb`` is
imported.  protoc writes ``from mmserve.common.v1 import ...``; we rewrite
those imports to live under ``mmserve_core.wire.pb`` so the generated package
needs no ``sys.path`` tricks.  The proto package names (``mmserve.*.v1``) and
hence reflection / grpcurl names are unchanged.

Runs on whatever thread calls it; touches only files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # mmserve_core/wire
PB_DIR = PACKAGE_DIR / "pb"
_IMPORT_RE = re.compile(r"^from mmserve\.(\S+) import", re.MULTILINE)


def find_proto_root() -> Path:
    """Locate ``protos/``: beside the package in a checkout, or shipped inside it."""
    for cand in (PACKAGE_DIR.parent.parent / "protos", PACKAGE_DIR.parent / "protos"):
        if (cand / "mmserve").is_dir():
            return cand
    raise FileNotFoundError("cannot find the protos/ directory with mmserve/*.proto")


def stale(proto_root: Path | None = None, out_dir: Path = PB_DIR) -> bool:
    """True if stubs are missing or older than any .proto (an edited checkout)."""
    if not (out_dir / "mmserve" / "chat" / "v1" / "chat_pb2_grpc.py").exists():
        return True
    try:
        root = proto_root or find_proto_root()
    except FileNotFoundError:
        return False  # installed without sources: the built stubs are all there is
    built = min(p.stat().st_mtime for p in out_dir.rglob("*_pb2*.py"))
    return any(p.stat().st_mtime > built for p in root.rglob("*.proto"))


def generate(proto_root: Path | None = None, out_dir: Path = PB_DIR) -> list[Path]:
    """Run protoc on every .proto under ``proto_root`` and return written files."""
    from grpc_tools import protoc  # build-time / first-import dependency

    proto_root = proto_root or find_proto_root()
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for py in out_dir.rglob("*.py*"):
        text = py.read_text()
        fixed = _IMPORT_RE.sub(r"from mmserve_core.wire.pb.mmserve.\1 import", text)
        if fixed != text:
            py.write_text(fixed)
        written.append(py)
    for d in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return written


def main() -> None:
    files = generate()
    print(f"generated {len(files)} files under {PB_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()

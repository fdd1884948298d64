"""The layering, read from every module's imports (function-local ones included).

- the core (``mmserve_core``) imports no service, no deploy tooling, no tests;
- a service imports no other service, nothing from ``deploy`` or ``tests``;
- ``deploy`` (the main job, the process manager) imports no service and nothing from ``tests``;
- the gateway imports no MLX;
- protobuf (generated stubs, ``google.protobuf``) only in transport and codec modules — and no other
  module handles a protobuf message either (``WhichOneof``, ``HasField``, …, or a codec ``*_pb``
  function): the decoder's intake and the gateway's pipeline see typed objects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("encoder_service", "decoder_service", "gateway")
MLX = ("mlx", "mlx_lm", "mlx_vlm")
# The transport and codec modules: the only ones that may touch protobuf.
PROTOBUF_ALLOWED = {
    "mmserve_core/wire/stubs.py",       # the import point for the generated stubs
    "mmserve_core/wire/protogen.py",    # generates them
    "mmserve_core/wire/codec.py",       # wire <-> plain types
    "mmserve_core/runtime/grpc_runtime.py",  # server scaffolding: request parsing, health
    "mmserve_core/client.py",           # the public client's transport
    "encoder_service/server.py",
    "decoder_service/server.py",
    "gateway/clients.py",               # the gateway's upstream calls
    "gateway/pool.py",                  # upstream health watching
    "gateway/chat_server.py",           # the typed gRPC front
    "deploy/processes.py",              # health checks of the processes it starts
}


def _modules(*tops: str) -> list[Path]:
    out = []
    for top in tops:
        out += [p for p in (ROOT / top).rglob("*.py") if "pb" not in p.relative_to(ROOT).parts]
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_every_package_was_read():
    assert len(_modules("mmserve_core")) >= 10 and all(_modules(s) for s in SERVICES)


@pytest.mark.parametrize("path", _modules("mmserve_core"), ids=_rel)
def test_the_core_imports_no_service_and_no_tooling(path):
    bad = {n for n in _imports(path) if _top(n) in (*SERVICES, "deploy", "tests")}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules(*SERVICES), ids=_rel)
def test_a_service_imports_no_other_service_and_no_tooling(path):
    own = _rel(path).split("/")[0]
    bad = {n for n in _imports(path) if _top(n) in (*SERVICES, "deploy", "tests") and _top(n) != own}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("deploy"), ids=_rel)
def test_deploy_imports_no_tests_and_no_service_code(path):
    """The main job and the process manager run from an install, where ``tests`` does not exist;
    they start services as processes, never import them."""
    bad = {n for n in _imports(path) if _top(n) in (*SERVICES, "tests")}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("gateway"), ids=_rel)
def test_the_gateway_imports_no_mlx(path):
    bad = {n for n in _imports(path) if _top(n) in MLX}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("mmserve_core", *SERVICES, "deploy"), ids=_rel)
def test_protobuf_only_in_transport_and_codec_modules(path):
    pb = {n for n in _imports(path)
          if n.startswith("google.protobuf") or n.endswith(("_pb2", "_pb2_grpc")) or n.startswith("mmserve_core.wire.stubs")
          or n.startswith("mmserve_core.wire.pb")}
    if _rel(path) not in PROTOBUF_ALLOWED:
        assert not pb, f"{_rel(path)} imports {sorted(pb)}: protobuf belongs in transport and codec modules"


PB_METHODS = {"WhichOneof", "HasField", "ByteSize", "SerializeToString", "ParseFromString", "CopyFrom",
              "MergeFrom", "ListFields", "ClearField"}


def _protobuf_handling(path: Path) -> set[str]:
    """Protobuf message methods called, and codec names that take or make messages, in ``path``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            if node.attr in PB_METHODS:
                found.add(node.attr)
            if node.attr.endswith(("_pb", "_PB")) or "_from_pb" in node.attr or "_to_pb" in node.attr:
                found.add(node.attr)
    return found


@pytest.mark.parametrize("path", _modules("mmserve_core", *SERVICES, "deploy"), ids=_rel)
def test_protobuf_messages_are_handled_only_in_transport_and_codec_modules(path):
    if _rel(path) not in PROTOBUF_ALLOWED:
        found = _protobuf_handling(path)
        assert not found, f"{_rel(path)} handles protobuf messages ({sorted(found)}): leave that to the codec"


def test_the_checks_can_fail():
    """The import reader sees a function-local import and a from-import of a submodule."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("def f():\n    from gateway import chat\n    import mlx.core as mx\n")
    names = _imports(Path(f.name))
    assert "gateway.chat" in names and "mlx.core" in names
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("def g(msg):\n    return msg.WhichOneof('payload'), codec.sampling_from_pb(msg.setup.sampling)\n")
    assert _protobuf_handling(Path(f.name)) == {"WhichOneof", "sampling_from_pb"}

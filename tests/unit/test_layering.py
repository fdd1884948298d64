"""The layering, read from every module's imports (function-local ones included).

- the core (``mmserve_core``) imports no service, no deploy tooling, no tests;
- a service imports no other service, nothing from ``deploy`` or ``tests``;
- ``deploy`` (the main job, the process manager) imports no service and nothing from ``tests``;
- the gateway imports no MLX;
- in the gateway, a front (``gateway/fronts/<api>``) imports no other front, and nothing outside
  ``gateway/fronts`` imports a front but the app and the entry point that mount them;
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
    "gateway/upstream/clients.py",      # the gateway's upstream calls
    "gateway/upstream/pool.py",         # upstream health watching
    "gateway/fronts/grpc_chat/server.py",  # the typed gRPC front: its servicer
    "gateway/fronts/grpc_chat/codec.py",   # and its messages <-> the gateway's types
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
        f.write("def f():\n    from gateway import request\n    import mlx.core as mx\n")
    names = _imports(Path(f.name))
    assert "gateway.request" in names and "mlx.core" in names
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("def g(msg):\n    return msg.WhichOneof('payload'), codec.sampling_from_pb(msg.setup.sampling)\n")
    assert _protobuf_handling(Path(f.name)) == {"WhichOneof", "sampling_from_pb"}


FRONT_MOUNTS = {"gateway/app.py", "gateway/__main__.py"}  # mount the fronts' routes and servicer


def _front_of(module: str) -> str | None:
    """``gateway.fronts.openai_chat.parse`` -> ``openai_chat``; the front modules' package name."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["gateway", "fronts"] else None


@pytest.mark.parametrize("path", _modules("gateway"), ids=_rel)
def test_a_front_imports_no_other_front_and_the_core_imports_no_front(path):
    rel = _rel(path)
    mine = _front_of(rel.removesuffix(".py").replace("/", "."))
    fronts = {f for f in map(_front_of, _imports(path)) if f is not None}
    if mine is not None:
        assert fronts <= {mine}, f"{rel} (front {mine}) imports the fronts {sorted(fronts - {mine})}"
    elif rel not in FRONT_MOUNTS:
        assert not fronts, f"{rel} is the gateway's core but imports the fronts {sorted(fronts)}"

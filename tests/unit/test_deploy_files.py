"""Every file under deploy/ parses, and every command, flag and environment variable it uses exists."""

from __future__ import annotations

import configparser
import dataclasses
import plistlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from decoder_service.config import DecoderConfig
from decoder_service.config import parse_args as decoder_args
from deploy.processes import parse_args as up_args
from encoder_service.config import EncoderConfig
from encoder_service.config import parse_args as encoder_args
from gateway.config import parse_args as gateway_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PARSERS = {"mmserve-encoder": encoder_args, "mmserve-decoder": decoder_args, "mmserve-gateway": gateway_args,
           "mmserve-up": up_args}
ENV_SOURCES = {"ENCODER": ["encoder_service/config.py", "mmserve_core/runtime/tls.py", "mmserve_core/runtime/service_main.py"],
               "DECODER": ["decoder_service/config.py", "mmserve_core/runtime/tls.py", "mmserve_core/runtime/service_main.py"],
               "GATEWAY": ["gateway/config.py", "mmserve_core/runtime/tls.py"]}
# settings fields declared with flag(...) (mmserve_core.runtime.flags), whose env names are generated
FLAG_FIELDS = {service: {f.name for f in dataclasses.fields(cls) if "flag" in f.metadata}
               for service, cls in (("ENCODER", EncoderConfig), ("DECODER", DecoderConfig))}


def check_command(argv: list[str], where: str):
    """Parse ``argv`` with the real CLI parser; returns the parsed settings."""
    cmd = Path(argv[0]).name
    assert cmd in PARSERS, f"{where}: unknown command {cmd}"
    args = argv[1:]
    if "--checkpoint" not in args:
        args = [*args, "--checkpoint", "/models/x"]
    try:
        return PARSERS[cmd](args)
    except SystemExit as e:
        pytest.fail(f"{where}: {cmd} {' '.join(argv[1:])} does not parse ({e})")


def check_env(name: str, where: str) -> None:
    if name in ("MMSERVE_LOG_JSON", "MMSERVE_CHECKPOINT"):
        return
    m = re.fullmatch(r"MMSERVE_(ENCODER|DECODER|GATEWAY)_([A-Z0-9_]+)", name)
    assert m, f"{where}: {name} is not an mmserve variable"
    declared = FLAG_FIELDS.get(m.group(1), set())
    if m.group(2).lower() in declared:
        return  # a flag(...) field: add_flags reads MMSERVE_<SERVICE>_<FIELD> for it
    text = "".join((ROOT / f).read_text() for f in ENV_SOURCES[m.group(1)])
    assert f'"{m.group(2)}"' in text, f"{where}: {name} is read by nothing"


def test_shell_scripts_are_valid_and_call_real_flags():
    checked = 0
    for sh in DEPLOY.rglob("*.sh"):
        subprocess.run(["bash", "-n", str(sh)], check=True)
        for line in sh.read_text().splitlines():
            m = re.search(r'"\$BIN/(mmserve-[a-z]+)"(.*)$', line)
            if m:
                check_command([m.group(1), *shlex.split(m.group(2).replace('"$CKPT"', "/m"))], str(sh))
                checked += 1
    assert checked >= 1  # deploy/one-mac/run.sh runs mmserve-up


def test_launchd_plists():
    plists = list(DEPLOY.rglob("*.plist"))
    assert plists
    for f in plists:
        d = plistlib.loads(f.read_bytes())
        assert d["Label"] and d["KeepAlive"] and d["RunAtLoad"]
        cfg = check_command(d["ProgramArguments"], str(f))
        assert cfg.grace_s < d.get("ExitTimeOut", 20), f  # launchd SIGKILLs after ExitTimeOut
        for k in d.get("EnvironmentVariables", {}):
            check_env(k, str(f))


def test_systemd_units():
    units = list(DEPLOY.rglob("*.service"))
    assert {u.name for u in units} == {"mmserve-encoder.service", "mmserve-decoder.service", "mmserve-gateway.service"}
    for u in units:
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str
        cp.read_string(u.read_text())
        assert cp["Service"]["KillSignal"] == "SIGTERM" and cp["Install"]["WantedBy"]
        cfg = check_command(shlex.split(cp["Service"]["ExecStart"]), str(u))
        # systemd SIGKILLs after TimeoutStopSec: the drain must end before it
        assert cfg.drain_grace_s + getattr(cfg, "drain_delay_s", 0) < float(cp["Service"]["TimeoutStopSec"]), u
        for line in u.read_text().splitlines():
            if line.startswith("Environment="):
                check_env(line.split("=", 1)[1].split("=")[0], str(u))


def test_kubernetes_manifests():
    docs = [d for f in DEPLOY.rglob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert ("Deployment", "mmserve-encoder") in kinds and ("Deployment", "mmserve-decoder") in kinds
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["mmserve-encoder"]["spec"]["clusterIP"] == "None"  # headless: client-side balancing
    assert services["mmserve-decoder"]["spec"]["clusterIP"] == "None"
    checked = 0
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            where = f"{d['metadata']['name']}/{c['name']}"
            cfg = check_command([*c["command"], *[str(a) for a in c["args"]]], where)
            checked += 1
            # the kubelet SIGKILLs after terminationGracePeriodSeconds (default 30)
            budget = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            assert cfg.drain_grace_s + getattr(cfg, "drain_delay_s", 0) < budget, where
            for e in c.get("env", []):
                check_env(e["name"], where)
            ports = {p["containerPort"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                spec = c[probe]
                port = spec.get("grpc", spec.get("httpGet", {})).get("port")
                assert port in ports, f"{where}: {probe} on {port}, not a container port"
            assert c["resources"]["requests"]
    assert checked == 3  # encoder, decoder, gateway


def test_dockerfile_copies_what_exists():
    text = (DEPLOY / "linux" / "Dockerfile").read_text()
    paths = [path for src in re.findall(r"^COPY (.+?) \S+$", text, re.M) for path in src.split()]
    assert len(paths) >= 5  # the build files and every package the install needs
    for path in paths:
        assert (ROOT / path).exists(), path


def test_readme_commands_use_real_flags():
    checked = 0
    for md in [ROOT / "README.md", *DEPLOY.rglob("*.md")]:
        for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"(?:^|\s|/)(mmserve-(?:encoder|decoder|gateway|up))\s+(--.*?)(?:&|$)", line)
                if m:
                    argv = [a for a in shlex.split(m.group(2).replace("$CKPT", "/m")) if a != "&"]
                    check_command([m.group(1), *argv], str(md))
                    checked += 1
    assert checked >= 3, checked  # at least the README's encoder, decoder and gateway commands

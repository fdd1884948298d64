"""The README's runnable client examples, run as written against the test services."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> dict[str, str]:
    text = README.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(
        r"<!-- runnable example: ([^>]+) -->\s*```python\n(.*?)```", text, re.S)}


def test_readme_has_the_examples():
    assert set(_examples()) == {"chat", "encoder + decoder"}


@pytest.mark.parametrize("name", ["chat", "encoder + decoder"])
def test_example_runs(services_e2b, name, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_examples()[name])
    env = dict(os.environ, MMSERVE_CHAT=services_e2b.chat_addr, MMSERVE_ENCODER=services_e2b.encoder_addr,
               MMSERVE_DECODER=services_e2b.decoder_addr)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    if name == "chat":
        assert "tokens" in r.stdout and ("length" in r.stdout or "stop" in r.stdout)
    else:
        assert "tokens; image hash" in r.stdout

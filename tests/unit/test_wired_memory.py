"""The wired limit: set to the device's recommended working set where there is one (Metal),
a logged no-op where there is none (this CPU), a warning when the weights come near it."""

from __future__ import annotations

import mlx.core as mx

from mmserve_core.runtime import wired_memory


def test_no_recommended_working_set_is_a_no_op(monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": "x86_64"})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    assert wired_memory.wire_weights(1 << 30, "lm") is None and calls == []


def test_metal_gets_the_recommended_limit_and_a_warning_near_it(monkeypatch):
    calls, warnings = [], []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 100 << 20})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    monkeypatch.setattr(wired_memory.log, "warning", lambda *a, **k: warnings.append(k))
    assert wired_memory.wire_weights(10 << 20, "lm") == 100 << 20 and calls == [100 << 20] and not warnings
    wired_memory.wire_weights(95 << 20, "lm")
    assert warnings and warnings[0]["recommended_mb"] == 100

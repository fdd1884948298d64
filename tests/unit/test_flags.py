"""Service flags declared once on the settings dataclass: defaults, env defaults, bounds, no field left flagless."""

from __future__ import annotations

import dataclasses

import pytest

from decoder_service.config import DecoderConfig
from decoder_service.config import parse_args as decoder_args
from encoder_service.config import EncoderConfig
from encoder_service.config import parse_args as encoder_args
from mmserve_core.runtime.service_main import ServiceSettings


@pytest.mark.parametrize("cls", [DecoderConfig, EncoderConfig])
def test_every_service_field_is_a_flag(cls):
    shared = {f.name for f in dataclasses.fields(ServiceSettings)}
    flagless = [f.name for f in dataclasses.fields(cls) if f.name not in shared and "flag" not in f.metadata]
    assert flagless == []


def test_defaults_are_the_dataclass_defaults():
    assert decoder_args(["--checkpoint", "x"]) == DecoderConfig(checkpoint="x")
    assert encoder_args(["--checkpoint", "x"]) == EncoderConfig(checkpoint="x")


def test_env_default_then_flag(monkeypatch):
    monkeypatch.setenv("MMSERVE_DECODER_PREFILL_BUDGET_TOKENS", "64")
    monkeypatch.setenv("MMSERVE_DECODER_CONTEXT_LENGTH", "4096")
    monkeypatch.setenv("MMSERVE_ENCODER_MAX_QUEUE", "7")
    cfg = decoder_args(["--checkpoint", "x"])
    assert (cfg.prefill_budget_tokens, cfg.context_length) == (64, 4096)
    assert decoder_args(["--checkpoint", "x", "--prefill-budget-tokens", "8"]).prefill_budget_tokens == 8
    assert encoder_args(["--checkpoint", "x"]).max_queue == 7


@pytest.mark.parametrize("argv", [["--kv-bits", "3"], ["--prefill-budget-tokens", "0"], ["--max-active", "x"]])
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        decoder_args(["--checkpoint", "x", *argv])
    assert argv[0] in capsys.readouterr().err


def test_a_bad_env_value_is_refused_like_a_flag(monkeypatch, capsys):
    monkeypatch.setenv("MMSERVE_DECODER_KV_BITS", "5")
    with pytest.raises(SystemExit):
        decoder_args(["--checkpoint", "x"])
    assert "--kv-bits" in capsys.readouterr().err

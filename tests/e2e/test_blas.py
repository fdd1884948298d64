"""The services on an optimized BLAS (Debian's OpenBLAS, preloaded by re-exec) give the same
greedy tokens as on the wheel's reference BLAS, say which one they run on (log and metric), and
``MMSERVE_BLAS=reference`` opts out."""

from __future__ import annotations

import httpx
import pytest

from deploy.processes import start_services
from mmserve_core.client import ChatClient
from mmserve_core.runtime.blas import blas_in_use, installed_library

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(installed_library() is None,
                                                  reason="no optimized BLAS on this machine (.ci/run installs one)")]
PROMPTS = ["hello", "count to ten", "what is red?", "a b c d"]


def _run(ckpt, blas: str | None, monkeypatch) -> tuple[list[list[int]], str, str]:
    if blas is None:
        monkeypatch.delenv("MMSERVE_BLAS", raising=False)
    else:
        monkeypatch.setenv("MMSERVE_BLAS", blas)
    with start_services(ckpt, decoder_args=["--metrics-port", "0"]) as svc:
        with ChatClient(svc.chat_addr) as c:
            outs = [c.chat([{"role": "user", "content": p}], max_tokens=24, temperature=0).token_ids for p in PROMPTS]
        dec_log = (svc.log_dir / "decoder.log").read_text()
        enc_log = (svc.log_dir / "encoder.log").read_text()
    return outs, dec_log, enc_log


def test_greedy_tokens_are_the_same_on_either_blas(ckpt_e2b, monkeypatch):
    fast, dec_fast, enc_fast = _run(ckpt_e2b, None, monkeypatch)
    ref, dec_ref, _ = _run(ckpt_e2b, "reference", monkeypatch)
    assert "library=openblas" in dec_fast and "library=openblas" in enc_fast
    assert "library=reference" in dec_ref
    assert fast == ref and all(len(o) == 24 for o in fast)


def test_which_blas_is_read_from_the_process_maps():
    assert blas_in_use("7f.. r-xp /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0\\n") == "openblas"
    assert blas_in_use("7f.. r-xp /x/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\\n") == "reference"
    assert blas_in_use("") == "unknown"


def test_the_metric_names_the_library(ckpt_e2b, monkeypatch):
    from deploy.processes import start_decoder

    monkeypatch.delenv("MMSERVE_BLAS", raising=False)
    with start_decoder(ckpt_e2b, ["--metrics-port", "0"]) as svc:
        url = next(line.split("address=")[1].split()[0] for line in (svc.log_dir / "decoder.log").read_text()
                   .splitlines() if "metrics listening" in line)
        text = httpx.get(url, timeout=10).text
    assert 'mmserve_decoder_blas{library="openblas"} 1.0' in text

"""The cache facts batched drafting stands on (``decoder_service.batch_drafting``), checked against
one-token steps on mlx-vlm's batch caches — left-padded rows, windows that have wrapped."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import _merge_caches
from mlx_vlm.speculative.cache_state import start_speculative_cache

from decoder_service import mtp_adapter
from decoder_service.model import LanguageModelRunner
from tests.tooling.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module", params=["dense", "e2b"])
def ckpt(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bd") / request.param, variant=request.param, dtype="float32")


@pytest.fixture(scope="module")
def runner(ckpt):
    return LanguageModelRunner(ckpt)


def _rows(runner, lengths=(30, 33, 150), seed=0):
    rng = np.random.default_rng(seed)
    prompts = [[2, *map(int, rng.integers(10, 240, n))] for n in lengths]  # window 64: the long one wraps
    return prompts, [runner.prefill(p[:-1], [])[0] for p in prompts]


def _close(a, b) -> float:
    a, b = np.array(a), np.array(b)
    f = np.isfinite(a) & np.isfinite(b)  # suppressed ids are -inf in both
    return float(np.abs(a[f] - b[f]).max())


def test_rows_keep_each_their_accepted_positions(runner):
    """Verify blocks of 4, each row keeping its own 1..4 positions, round after round: every kept
    position's logits equal the row's own one-token decode of the same tokens."""
    fwd = runner.logits_model()
    prompts, rows = _rows(runner)
    batch = _merge_caches(rows)
    solo = [runner.prefill(p[:-1], [])[0] for p in prompts]
    nxt = [p[-1] for p in prompts]
    rng = np.random.default_rng(1)
    for _ in range(12):
        drafts = rng.integers(10, 240, (3, 3))
        keep = [int(x) for x in rng.integers(1, 5, 3)]
        if len(set(keep)) == 1:
            keep[0] = 1 + keep[0] % 4  # ragged: the per-row path
        mtp_adapter.unrotate(batch)
        tx = start_speculative_cache(batch, 4)
        logits = fwd(mx.array([[nxt[i], *map(int, drafts[i])] for i in range(3)]), cache=batch)
        tx.commit(keep)
        for i in range(3):
            for j, t in enumerate([nxt[i], *map(int, drafts[i][: keep[i] - 1])]):
                assert _close(fwd(mx.array([[t]]), cache=solo[i])[0, -1], logits[i, j]) < 1e-3
            nxt[i] = int(rng.integers(10, 240))


def test_a_wrapped_window_needs_unrotating_before_a_block_forward(runner):
    """mlx-vlm 0.7: after rounds that keep one position in every row (replayed one token at a time,
    so the window's ring wraps), a 4-token forward masks left-padded rows one position off unless
    the cache is put in temporal order first (``mtp_adapter.unrotate``).  When this test's first
    half fails, mlx-vlm has fixed it and ``unrotate`` can go."""
    fwd = runner.logits_model()

    def rounds(fix: bool) -> float:
        prompts, rows = _rows(runner, seed=3)
        batch, plain = _merge_caches(rows), _merge_caches([runner.prefill(p[:-1], [])[0] for p in prompts])
        nxt, worst = [p[-1] for p in prompts], 0.0
        for k in range(6):
            if fix:
                mtp_adapter.unrotate(batch)
            tx = start_speculative_cache(batch, 4)
            logits = fwd(mx.array([[n, 5, 6, 7] for n in nxt]), cache=batch)
            tx.commit([1, 1, 1])
            ref = fwd(mx.array([[n] for n in nxt]), cache=plain)
            worst = max(worst, _close(logits[:, 0], ref[:, 0]))
            nxt = [10 + k, 20 + k, 30 + k]
        return worst

    assert rounds(fix=False) > 1e-3
    assert rounds(fix=True) < 1e-4


def test_one_batched_draft_equals_each_rows_own(runner, ckpt, tmp_path):
    """``batch_drafting._draft_rows``: rows at different positions (one past its window) drafted in
    one ``draft_block`` get the drafts each gets alone."""
    from decoder_service.batch_drafting import _draft_rows, _row_kv, read_layers
    from decoder_service.drafter import Drafter
    from tests.tooling.tiny_checkpoint import write_tiny_drafter

    drafter = Drafter(write_tiny_drafter(tmp_path / "d", ckpt, seed=2), runner.lm)
    prompts, rows = _rows(runner, lengths=(30, 150, 70), seed=5)
    batch = _merge_caches(rows)
    logits, hidden, _ = mtp_adapter.forward(runner.lm, mx.array([[p[-1]] for p in prompts]), batch)
    hid = [mtp_adapter.draft_hidden(runner.lm, hidden[i: i + 1]) for i in range(3)]
    pending = [int(t) for t in mx.argmax(logits[:, -1], axis=-1).tolist()]

    class Rows:  # what _draft_rows reads of a GenerationBatch
        prompt_cache = batch
        tokens = [list(p) for p in prompts]

    layers = read_layers(runner.lm)
    together = _draft_rows(drafter, Rows, layers, [0, 1, 2], pending, hid, 3)
    for i in range(3):
        alone = mtp_adapter.draft(drafter.model, pending[i], hid[i], _row_kv(batch, layers, i), len(prompts[i]), 3)
        assert np.array(together[i]).tolist() == np.array(alone).tolist()

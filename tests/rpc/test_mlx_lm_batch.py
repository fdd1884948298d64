"""The two mlx-lm internals the decoder's batched grammar mask reads (``decoder_service/mlx_lm_batch.py``),
checked on a tiny mlx-lm model: if an mlx-lm upgrade changes either, this fails by name — before a
constraint is applied to the wrong row."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama

from decoder_service import mlx_lm_batch


class Recorder:
    """A tiny llama that records, for each one-token model call, which uids' rows it computes —
    each row's input token is its uid (every row is fed its own id, so the logits say who it is)."""

    def __init__(self) -> None:
        args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64)
        self.model = llama.Model(args)
        self.calls: list[list[int]] = []
        self.layers = self.model.layers

    def __call__(self, inputs, cache=None, **kw):
        if inputs.shape[1] == 1:
            self.calls.append([int(x) for x in inputs[:, 0].tolist()])
        logits = self.model(inputs, cache=cache, **kw)
        # every row samples its own input token again (greedy), so a row's token is its uid forever
        return mx.where(mx.arange(logits.shape[-1]) == inputs[:, -1:, None], 0.0, -1e9).astype(logits.dtype) \
            + 0 * logits

    def make_cache(self):
        return self.model.make_cache()


def test_the_installed_mlx_lm_is_the_minor_the_adapter_was_checked_on():
    assert mlx_lm.__version__.startswith(mlx_lm_batch.TESTED_MINOR + "."), (
        f"mlx-lm {mlx_lm.__version__}: re-check decoder_service/mlx_lm_batch.py's two facts and update "
        f"TESTED_MINOR and the pin in pyproject.toml")


def test_running_rows_are_read_and_called_first_then_the_inserted_rows():
    rec = Recorder()
    bg = BatchGenerator(rec, completion_batch_size=8, prefill_batch_size=8)
    greedy = [lambda lp: mx.argmax(lp, axis=-1)]
    # each row's single prompt token is the number that will identify it in the recorded calls
    [a] = bg.insert([[7]], max_tokens=[50], samplers=greedy)
    rec.calls.clear()
    calls = mlx_lm_batch.step_calls(bg, [a])
    bg.next()
    assert mlx_lm_batch.readable(bg), "mlx-lm's BatchGenerator has no _generation_batch"
    assert [[7] * len(c) for c in calls] == rec.calls, (calls, rec.calls)
    assert mlx_lm_batch.running_uids(bg) == [a]
    b, c = bg.insert([[9], [11]], max_tokens=[50, 50], samplers=greedy * 2)
    calls = mlx_lm_batch.step_calls(bg, [b, c])
    assert calls == [[a], [b, c]]
    rec.calls.clear()
    bg.next()
    token_of = {a: 7, b: 9, c: 11}
    # fact 2: one call for the running rows, then one for the new rows, in insertion order
    assert rec.calls == [[token_of[u] for u in call] for call in calls], rec.calls
    # fact 1: the running rows in the order the next call feeds them
    order = mlx_lm_batch.running_uids(bg)
    rec.calls.clear()
    bg.next()
    assert rec.calls == [[token_of[u] for u in order]], (order, rec.calls)


@pytest.mark.parametrize("attr", ["_generation_batch"])
def test_a_generator_without_the_internals_reads_as_unreadable(attr):
    class Bare:
        pass

    assert not mlx_lm_batch.readable(Bare()) and mlx_lm_batch.running_uids(Bare()) == []

"""Span checks, sampling resolution and the EOS union (pure logic)."""

from __future__ import annotations

import pytest

from decoder_service.placement import validate_prompt
from decoder_service.sampling import resolve_sampling
from mmserve_core.runtime.checkpoint import read_checkpoint
from mmserve_core.wire.errors import FailedPrecondition, InvalidArgument
from mmserve_core.wire.types import SamplingParams, Span

PH = {"image": 252, "audio": 253}


def _check(ids, spans):
    validate_prompt(ids, spans, placeholder_ids=PH, vocab_size=512, hidden_size=64, context_length=4096)


def _span(offset, length, modality="image", rows=None, width=64):
    return (Span(offset, length, modality), "bfloat16", (length if rows is None else rows, width))


IDS = [2, 105, 10, 250, 252, 252, 252, 254, 251, 253, 253, 255, 106]


def test_valid_prompt_passes():
    _check(IDS, [_span(4, 3), _span(9, 2, "audio")])


@pytest.mark.parametrize("spans,needle", [
    ([_span(4, 3, rows=2), _span(9, 2, "audio")], "span length 3 != embedding rows 2"),
    ([_span(4, 3, width=32), _span(9, 2, "audio")], "width 32"),
    ([_span(3, 3), _span(9, 2, "audio")], "expected the image placeholder id 252"),
    ([_span(4, 3), _span(9, 2, "image")], "expected the image placeholder id 252"),
    ([_span(4, 3), _span(5, 2)], "overlapping"),
    ([_span(4, 3), _span(12, 5, "audio")], "runs past the end"),
    ([_span(4, 3)], "outside any span"),
    ([_span(4, 0), _span(9, 2, "audio")], "length is 0"),
])
def test_bad_spans_are_invalid_argument(spans, needle):
    with pytest.raises(InvalidArgument, match=needle):
        _check(IDS, spans)


def test_out_of_vocab_and_empty():
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        _check([2, 9999], [])
    with pytest.raises(InvalidArgument, match="empty"):
        _check([], [])


def test_unknown_modality_for_model():
    with pytest.raises(FailedPrecondition):
        validate_prompt(IDS, [_span(4, 3), _span(9, 2, "audio")], placeholder_ids={"image": 252},
                        vocab_size=512, hidden_size=64, context_length=4096)


def _resolve(s, **kw):
    args = dict(prompt_len=10, context_length=100, vocab_size=512, generation_config={})
    args.update(kw)
    return resolve_sampling(s, **args)


def test_sampling_defaults():
    r = _resolve(SamplingParams(), generation_config={"do_sample": True, "temperature": 0.7, "top_k": 64,
                                                       "top_p": 0.95})
    assert (r.temperature, r.top_k, r.top_p, r.max_tokens) == (0.7, 64, 0.95, 90)
    assert r.logit_bias == {}  # media suppression is the runner's, for every row at once
    assert _resolve(SamplingParams(), generation_config={"do_sample": False}).temperature == 0.0


def test_max_tokens_over_context_names_both_numbers():
    with pytest.raises(InvalidArgument, match=r"prompt \(10 tokens\) \+ max_tokens \(95\).*100"):
        _resolve(SamplingParams(max_tokens=95))


@pytest.mark.parametrize("s", [SamplingParams(temperature=-1), SamplingParams(top_p=0.0),
                               SamplingParams(top_k=-2), SamplingParams(logit_bias={600: 1.0}),
                               SamplingParams(stop_token_ids=[-1]), SamplingParams(max_tokens=0)])
def test_bad_sampling_rejected(s):
    with pytest.raises(InvalidArgument):
        _resolve(s)


def test_eos_union(ckpt_e2b):
    info = read_checkpoint(ckpt_e2b)
    assert info.config_eos == (1, 106, 50)
    assert info.generation_config_eos == (1, 106)
    assert info.eos_token_ids([1]) == [1, 50, 106]
    assert info.media_token_ids == [249, 250, 251, 252, 253, 254, 255]

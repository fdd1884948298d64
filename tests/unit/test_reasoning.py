"""The thought channel never reaches ``content``, however the stream is cut."""

from __future__ import annotations

import pytest

from gateway.reasoning import ReasoningParser

FULL = "<|channel>thought\nLet me think.\nStep 2.<channel|>The answer is 4."


def _run(deltas):
    p = ReasoningParser()
    c, r = zip(*(p.feed(d) for d in deltas))
    return "".join(c), "".join(r)


@pytest.mark.parametrize("cuts", [[], [10], [17, 18], [30, 40, 41], list(range(1, len(FULL)))])
def test_split_anywhere_between_tokens(cuts):
    # markers are whole tokens: cut only outside them
    marks = [(FULL.index(m), FULL.index(m) + len(m)) for m in ("<|channel>", "<channel|>")]
    cuts = [c for c in cuts if not any(a < c < b for a, b in marks)]
    pieces = [FULL[i:j] for i, j in zip([0, *cuts], [*cuts, len(FULL)])]
    assert _run(pieces) == ("The answer is 4.", "Let me think.\nStep 2.")


def test_truncated_thought_is_all_reasoning_and_stray_markers_vanish():
    assert _run(["<|channel>thought\nhmm", " still"]) == ("", "hmm still")
    assert _run(["A<channel|>B", "<|channel><|channel>x\ny<|channel>z"]) == ("AB", "yz")
    assert _run(["plain answer"]) == ("plain answer", "")

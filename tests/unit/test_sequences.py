"""The decoder's sequence table: allowed and forbidden moves, its indexes, and ``take_all``
(what a failed step answers) returning every held sequence once, whatever its phase."""

from __future__ import annotations

import itertools

import pytest

from decoder_service.sequences import NEXT, GenerationJob, Phase, SequenceTable


def _job(n: int = 0) -> GenerationJob:
    return GenerationJob(ids=[2, 10 + n], spans=[], sampling=None, stop_ids=frozenset(), soft_tokens=0,
                         emit=lambda ev: None)


# each phase, reached from OPENING by allowed moves (with a batch uid where one is needed)
_PATHS = {
    Phase.OPENING: [],
    Phase.PREFILL_TEXT: [Phase.PREFILL_TEXT],
    Phase.PREFILL_MEDIA: [Phase.PREFILL_MEDIA],
    Phase.SOLO: [Phase.PREFILL_MEDIA, Phase.SOLO],
    Phase.BATCH: [Phase.PREFILL_TEXT, Phase.BATCH],
}
_uids = itertools.count()


def _at(table: SequenceTable, phase: Phase, n: int = 0):
    seq = table.take(_job(n))
    for p in _PATHS[phase]:
        table.move(seq, p, uid=next(_uids) if p is Phase.BATCH else None)
    return seq


def test_every_allowed_move_is_made_and_every_other_refused():
    for src, dst in itertools.product(_PATHS, Phase):
        table = SequenceTable()
        seq = _at(table, src)
        uid = next(_uids) if dst is Phase.BATCH else None
        if dst in NEXT[src]:
            table.move(seq, dst, uid=uid)
            assert seq.phase is dst
            assert len(table) == (0 if dst is Phase.DONE else 1)
        else:
            with pytest.raises(RuntimeError, match="cannot move"):
                table.move(seq, dst, uid=uid)
            assert seq.phase is src and len(table) == 1


def test_the_lifecycles_the_scheduler_uses_are_allowed():
    assert NEXT[Phase.OPENING] >= {Phase.PREFILL_TEXT, Phase.PREFILL_MEDIA, Phase.SOLO, Phase.BATCH}
    assert NEXT[Phase.PREFILL_TEXT] == {Phase.BATCH, Phase.DONE}  # the batch samples its first token
    assert Phase.BATCH in NEXT[Phase.SOLO] and Phase.SOLO not in NEXT[Phase.BATCH]  # no way back
    assert all(Phase.DONE in NEXT[p] for p in Phase if p is not Phase.DONE)  # any may fail or be cancelled
    assert NEXT[Phase.DONE] == frozenset()


def test_a_finished_sequence_cannot_move_again():
    table = SequenceTable()
    seq = _at(table, Phase.BATCH)
    table.finish(seq)
    assert seq.phase is Phase.DONE and len(table) == 0 and table.batched(seq.uid) is None
    with pytest.raises(RuntimeError):
        table.finish(seq)
    with pytest.raises(RuntimeError):
        table.move(seq, Phase.BATCH, uid=next(_uids))


def test_batch_and_solo_indexes_follow_the_moves():
    table = SequenceTable()
    seq = _at(table, Phase.PREFILL_MEDIA)
    seq.cache, seq.fed, seq.pending = ["kv"], [1, 2], ("next", "logprobs")
    table.move(seq, Phase.SOLO)
    assert table.solo is seq
    with pytest.raises(RuntimeError, match="second sequence"):
        table.move(_at(table, Phase.OPENING, 1), Phase.SOLO)
    table.move(seq, Phase.BATCH, uid=41)
    assert table.solo is None and table.batched(41) is seq and table.in_batch() == [seq]
    assert seq.cache is None and seq.fed is None and seq.pending is None  # the batch owns its KV now
    with pytest.raises(RuntimeError, match="new uid"):  # a uid the batch already uses
        table.move(_at(table, Phase.PREFILL_TEXT, 2), Phase.BATCH, uid=41)
    with pytest.raises(RuntimeError, match="new uid"):  # or none at all
        table.move(_at(table, Phase.PREFILL_TEXT, 3), Phase.BATCH)
    table.finish(seq)
    assert table.batched(41) is None and table.in_batch() == []


def test_take_all_returns_every_held_sequence_once_whatever_its_phase():
    table = SequenceTable()
    held = [_at(table, phase, n) for n, phase in enumerate(_PATHS)]
    held += [_at(table, Phase.BATCH, 9), _at(table, Phase.PREFILL_TEXT, 10)]
    finished = _at(table, Phase.BATCH, 11)
    table.finish(finished)
    assert len(table) == len(held) == 7  # the slots taken: every phase but DONE
    assert {p: table.count(p) for p in _PATHS} == {Phase.OPENING: 1, Phase.PREFILL_TEXT: 2,
                                                   Phase.PREFILL_MEDIA: 1, Phase.SOLO: 1, Phase.BATCH: 2}
    out = table.take_all()
    assert len(out) == len(held) and {id(s) for s in out} == {id(s) for s in held}  # once each, none missed
    assert finished not in out
    assert all(s.phase is Phase.DONE for s in out)
    assert len(table) == 0 and table.solo is None and table.in_batch() == [] and list(table) == []
    assert table.take_all() == []

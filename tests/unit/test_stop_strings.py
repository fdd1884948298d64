"""Stop strings on detokenized text: across token boundaries, minimal hold-back."""

from __future__ import annotations

from decoder_service.stop_strings import StopStringFilter


def _run(stops, deltas):
    f = StopStringFilter(stops)
    out, matched = [], None
    for d in deltas:
        text, matched = f.feed(d)
        out.append(text)
        if matched:
            return out, matched
    out.append(f.flush())
    return out, None


def test_match_split_across_deltas_and_text_stops_before_it():
    out, matched = _run(["END"], ["Hello E", "N", "D and more"])
    assert "".join(out) == "Hello " and matched == "END"
    assert out[0] == "Hello "  # only the possible start "E" was held


def test_false_start_is_released_as_soon_as_it_cannot_match():
    out, matched = _run(["END"], ["say EN", "Ough"])
    assert matched is None and out == ["say ", "ENOugh", ""]


def test_earliest_of_several_stops_wins():
    out, matched = _run(["world", "lo w"], ["hel", "lo world"])
    assert matched == "lo w" and "".join(out) == "hel"


def test_stop_inside_one_delta_and_no_stops():
    assert _run(["\n\n"], ["a\n\nb"]) == (["a"], "\n\n")
    f = StopStringFilter([])
    assert not f and f.feed("abc") == ("abc", None)


def test_hold_back_is_never_longer_than_a_stop_prefix():
    f = StopStringFilter(["abcd"])
    assert f.feed("xxabc") == ("xx", None)
    assert f.feed("x") == ("abcx", None)
    assert f.flush() == ""

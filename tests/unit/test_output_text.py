"""``OutputText``: the consumer's side of a generation — text from ids, stop strings, and the
completion as the client sees it (tokens after a stop string are neither shown nor billed)."""

from __future__ import annotations

from decoder_service.output_text import OutputText
from mmserve_core.wire import types as T


class _CharTokenizer:
    """id n -> the character chr(n) (a tokenizer whose every token is one character)."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def _done(n: int, finish: str = "length", stop_id: int | None = None) -> T.Completion:
    return T.Completion(finish, 5, n, 0, 1.0, 2.0, 3.0, stop_token_id=stop_id, cached_tokens=4)


def test_a_stop_string_inside_a_coalesced_event_cuts_text_and_tokens():
    out = OutputText(_CharTokenizer(), ["END"], logprobs=False)
    first = out.feed(T.TokenEvent(_ids("hello E"), ""))
    assert first.text == "hello " and out.matched is None  # "E" held: it may start "END"
    shown = out.feed(T.TokenEvent(_ids("NDmore"), ""))  # the scheduler coalesced 6 tokens
    assert shown.token_ids == _ids("ND") and shown.text == "" and out.matched == "END"
    assert out.feed(T.TokenEvent(_ids("xyz"), "")) is None  # decoded after the stop: never shown
    tail, done = out.finish(_done(12))
    assert tail is None
    assert (done.finish_reason, done.stop_string, done.completion_tokens, done.stop_token_id) == ("stop", "END", 9, None)
    assert done.cached_tokens == 4 and done.decode_ms == 3.0  # the scheduler's own figures are kept


def test_held_text_is_released_at_the_end_or_matches_then():
    out = OutputText(_CharTokenizer(), ["STOP"], logprobs=True)
    lp = T.TokenLogprob(ord("S"), -0.5, [])
    assert out.feed(T.TokenEvent(_ids("aS"), "", [lp, lp])).text == "a"
    tail, done = out.finish(_done(2))
    assert tail.text == "S" and tail.logprobs == [] and done.finish_reason == "length" and done.stop_string is None
    eos = OutputText(_CharTokenizer(), [], logprobs=False)
    eos.feed(T.TokenEvent(_ids("ab"), ""))
    tail, done = eos.finish(_done(3, "stop", stop_id=1))
    assert tail is None and done.stop_token_id == 1 and done.completion_tokens == 3

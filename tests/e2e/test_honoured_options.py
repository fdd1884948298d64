"""The options real clients send by default have their effect, through the official SDK: stored chat
completions (list, filter, retrieve, messages, update, delete), the tier served echoed, a Responses
conversation over the context truncated from its oldest turn when asked (and refused when not)."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.e2e


def _client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


def test_stored_chat_completions_round_trip(services_e2b):
    c = _client(services_e2b)
    made = [c.chat.completions.create(model="m", max_tokens=3, store=True, metadata={"topic": t, "n": str(i)},
                                      messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": f"question {i}"}])
            for i, t in enumerate(("a", "b", "a"))]
    unstored = c.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    stream = c.chat.completions.create(model="m", max_tokens=3, store=True, stream=True, metadata={"topic": "s"},
                                       messages=[{"role": "user", "content": "streamed"}])
    streamed_text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    ids = [m.id for m in made]
    listed = c.chat.completions.list(metadata={"topic": "a"})
    assert [x.id for x in listed.data] == [ids[0], ids[2]]
    assert [x.id for x in c.chat.completions.list(metadata={"topic": "a"}, order="desc").data] == [ids[2], ids[0]]
    page = c.chat.completions.list(limit=1, metadata={"topic": "a"})
    assert [x.id for x in page.data] == [ids[0]] and page.has_more
    got = c.chat.completions.retrieve(ids[1])
    assert got.choices[0].message.content == made[1].choices[0].message.content
    assert got.usage.completion_tokens == made[1].usage.completion_tokens
    s = c.chat.completions.list(metadata={"topic": "s"}).data
    assert len(s) == 1 and s[0].choices[0].message.content == streamed_text
    msgs = c.chat.completions.messages.list(ids[1]).data
    assert [(m.role, m.content) for m in msgs] == [("system", "Be brief."), ("user", "question 1")]
    updated = c.chat.completions.update(ids[1], metadata={"topic": "z"})
    assert [x.id for x in c.chat.completions.list(metadata={"topic": "z"}).data] == [ids[1]]
    assert updated.id == ids[1]
    assert c.chat.completions.delete(ids[1]).deleted
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.retrieve(ids[1])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.retrieve(unstored.id)


def test_the_tier_served_is_echoed(services_e2b):
    c = _client(services_e2b)
    for asked, served in (("flex", "flex"), ("priority", "priority"), ("auto", "default"), (None, "default")):
        kw = {"service_tier": asked} if asked else {}
        r = c.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}], **kw)
        assert r.service_tier == served
        rr = c.responses.create(model="m", input="x", max_output_tokens=1, **kw)
        assert rr.service_tier == served


def test_responses_truncation_auto_drops_the_oldest_turns(services_e2b):
    """A conversation of ~6k tokens on a 4,096-token model: ``truncation: "auto"`` answers from its
    latest turns (input tokens under the context), ``disabled`` (the default) is a 400."""
    c = _client(services_e2b)
    long = "lorem ipsum dolor sit amet " * 60  # well over 1,000 tokens on the tiny tokenizer
    items = []
    for i in range(5):
        items += [{"role": "user", "content": f"turn {i}: {long}"}, {"role": "assistant", "content": f"ok {i}"}]
    items.append({"role": "user", "content": "and now?"})
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="m", input=items, max_output_tokens=4)
    r = c.responses.create(model="m", input=items, max_output_tokens=4, truncation="auto")
    assert r.truncation == "auto" and r.status in ("completed", "incomplete")
    assert 0 < r.usage.input_tokens <= 4096 - 4

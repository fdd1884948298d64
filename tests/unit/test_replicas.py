"""Replica descriptions: digests judged, capabilities declared or implied, requests refused naming
what no replica has."""

from __future__ import annotations

import grpc
import pytest
from transformers import AutoTokenizer

from gateway.upstream.pool import UpstreamPool
from gateway.upstream.replicas import NoReplica, Replicas, capabilities
from mmserve_core.digests import template_digest, tokenizer_digest
from mmserve_core.wire import types as T
from tests.tooling.tiny_checkpoint import write_tiny_checkpoint

TOK, TMPL = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def _info(caps=("priority", "cache_point", "constraints", "logprobs"), version="1.5", tok=TOK, tmpl=TMPL,
          video=False) -> T.ModelInfo:
    media = {T.VIDEO: T.MediaTokens(1, 2, 3)} if video else {}
    return T.ModelInfo("m", "bfloat16", 64, 4096, [1], media, capabilities=frozenset(caps),
                       contract_version=version, tokenizer_digest=tok if version else "",
                       chat_template_digest=tmpl if version else "")


def test_digests_follow_what_decides_ids(tmp_path):
    a = AutoTokenizer.from_pretrained(write_tiny_checkpoint(tmp_path / "a"))
    b = AutoTokenizer.from_pretrained(write_tiny_checkpoint(tmp_path / "b"))
    assert tokenizer_digest(a) == tokenizer_digest(b)  # two copies of one tokenizer
    b.add_tokens(["<extra>"])
    assert tokenizer_digest(a) != tokenizer_digest(b)
    assert template_digest(a.chat_template) != template_digest(a.chat_template + " ")
    assert template_digest(None) == template_digest("")


def test_older_decoders_are_credited_with_what_every_version_honoured():
    assert capabilities(_info(caps=("priority",), version="")) == {"priority", "constraints", "logprobs",
                                                                     "thought_budget"}
    assert "video" in capabilities(_info(caps=(), version="", video=True))
    assert capabilities(_info(caps=("priority",))) == {"priority"}  # a 1.5 decoder says exactly what it has


@pytest.mark.asyncio
async def test_replicas_are_judged_and_requests_checked_against_what_they_declare():
    pool = UpstreamPool("decoder", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", lambda ch: None)
    said = {"127.0.0.1:1": _info(), "127.0.0.1:2": _info(tok="sha256:" + "c" * 64),
            "127.0.0.1:3": _info(caps=("priority",))}
    calls = []

    async def describe(u):
        calls.append(u.address)
        return said[u.address]

    try:
        r = Replicas(pool, describe, expect=(TOK, TMPL))
        await r.refresh()
        await r.refresh()  # described once each
        assert sorted(calls) == sorted(said)
        a, b, c = pool.upstreams
        assert a.refused is None and c.refused is None
        assert "tokenizer differs" in b.refused
        ok = r.eligible()
        assert [ok(u) for u in pool.upstreams] == [True, False, True]
        assert [r.eligible(frozenset({"constraints"}))(u) for u in pool.upstreams] == [True, False, False]
        r.check({"constraints": "response_format"})  # a routable replica has it
        with pytest.raises(NoReplica) as e:
            r.check({"thought_budget": "reasoning_effort"})
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "thought_budget (for reasoning_effort)" in e.value.details()
        assert r.first_info() is said["127.0.0.1:1"]
        assert r.status()["127.0.0.1:2"].startswith("refused: its tokenizer differs")
        pool.record(a, "UNAVAILABLE")  # down: forgotten, described again when it is back
        assert a.info is None and not ok(a)
        a.up = True
        await r.refresh()
        assert a.info is not None and calls.count("127.0.0.1:1") == 2
    finally:
        await pool.close()


async def _one_replica(info: T.ModelInfo):
    """A one-replica pool described as ``info``, judged against (TOK, TMPL): ``(pool, replicas)``."""
    pool = UpstreamPool("decoder", "127.0.0.1:1", lambda ch: None)

    async def describe(u):
        return info

    r = Replicas(pool, describe, expect=(TOK, TMPL))
    await r.refresh()
    return pool, r


@pytest.mark.asyncio
async def test_when_every_replica_is_refused_the_reason_is_given():
    pool, r = await _one_replica(_info(tmpl="sha256:" + "d" * 64))
    try:
        with pytest.raises(NoReplica) as e:
            r.first_info()
        assert "no decoder reads prompts as this gateway does" in e.value.details()
        assert "chat template differs" in e.value.details()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_an_older_decoder_is_accepted_unchecked():
    pool, r = await _one_replica(_info(caps=("priority",), version=""))
    try:
        assert pool.upstreams[0].refused is None and r.first_info().contract_version == ""
        r.check({"constraints": "response_format", "priority": "service_tier"})
    finally:
        await pool.close()

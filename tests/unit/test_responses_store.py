"""The Responses store: bounded by bytes (least recently used first), oversize entries refused,
namespaces (one per presented credential) isolated."""

from __future__ import annotations

from gateway.store import ResponseStore, StoredResponse, namespace
from mmserve_core.wire import types as T


def _entry(text_bytes: int) -> StoredResponse:
    msg = T.Message("user", [T.Part("text", "p", text="x" * text_bytes)], "p")
    return StoredResponse({"id": "r"}, [], [msg])


def test_least_recently_used_go_first_and_reads_refresh():
    store = ResponseStore(10_000)
    for i in range(4):
        assert store.put("ns", f"r{i}", _entry(2000))
    assert store.get("ns", "r0") is not None  # r0 is now the most recently used
    assert store.put("ns", "r4", _entry(2000))
    assert store.get("ns", "r1") is None and store.get("ns", "r0") is not None and store.evicted == 1
    assert store.nbytes <= store.max_bytes


def test_an_entry_over_the_whole_budget_is_not_kept():
    store = ResponseStore(1000)
    assert not store.put("ns", "big", _entry(5000)) and store.get("ns", "big") is None and len(store) == 0


def test_namespaces_are_isolated_and_delete_frees_bytes():
    store = ResponseStore(100_000)
    a, b = namespace("key-a"), namespace(b"key-b")
    assert a != b and namespace(None) == namespace("")
    store.put(a, "r", _entry(100))
    assert store.get(b, "r") is None and store.get(a, "r") is not None
    assert not store.delete(b, "r") and store.delete(a, "r") and store.nbytes == 0

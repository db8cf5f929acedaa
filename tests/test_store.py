"""The chat store, without Qt."""
from __future__ import annotations

import json

import pytest

from desktop.store import SCHEMA_VERSION, Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "t.db")


def test_schema_wal_and_reopen(tmp_path):
    s = Store(tmp_path / "a.db")
    assert s.schema_version() == SCHEMA_VERSION
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cid = s.create_conversation("Hello")
    s2 = Store(tmp_path / "a.db")  # migrations are idempotent
    assert s2.conversation(cid)["title"] == "Hello"


def test_a_newer_schema_is_refused(tmp_path):
    s = Store(tmp_path / "a.db")
    s.db["meta"].upsert({"key": "schema_version", "value": "99"}, pk="key")
    with pytest.raises(RuntimeError, match="newer moedesk"):
        Store(tmp_path / "a.db")


def test_messages_form_a_tree_with_versions(store):
    cid = store.create_conversation()
    u1 = store.add_message(cid, "user", "first question")
    a1 = store.add_message(cid, "assistant", "answer one", parent=u1)
    a2 = store.add_message(cid, "assistant", "answer two (regenerated)", parent=u1)
    assert [m["id"] for m in store.siblings(a1)] == [a1, a2]
    assert [m["content"] for m in store.active_thread(cid)] == ["first question", "answer two (regenerated)"]
    u1b = store.add_message(cid, "user", "first question, edited")  # an edit is a sibling root
    assert [m["id"] for m in store.siblings(u1)] == [u1, u1b]
    store.set_active_leaf(cid, store.deepest_leaf(u1))
    assert store.active_thread(cid)[-1]["id"] == a2


def test_streaming_reply_is_committed_in_batches_and_survives_a_crash(tmp_path):
    s = Store(tmp_path / "c.db")
    cid = s.create_conversation()
    u = s.add_message(cid, "user", "tell me")
    a = s.add_message(cid, "assistant", "", parent=u, status="streaming")
    s.update_content(a, "partial text so")
    del s  # the app dies here
    s = Store(tmp_path / "c.db")
    assert s.mark_interrupted() == 1
    m = s.message(a)
    assert m["status"] == "interrupted" and m["content"] == "partial text so"


def test_finish_with_stats(store):
    cid = store.create_conversation()
    a = store.add_message(cid, "assistant", "", status="streaming")
    store.finish_message(a, "done text", "complete", {"decode_tokens_per_s": 12.5})
    m = store.message(a)
    assert m["status"] == "complete" and m["stats"]["decode_tokens_per_s"] == 12.5


def test_search_finds_a_word(store):
    c1, c2 = store.create_conversation("a"), store.create_conversation("b")
    store.add_message(c1, "user", "How does the zeppelin float?")
    store.add_message(c2, "assistant", "Nothing about airships here")
    hits = store.search("zeppelin")
    assert len(hits) == 1 and hits[0]["conversation_id"] == c1 and "[zeppelin]" in hits[0]["snippet"]
    assert store.search('we"ird (') == []  # user input is quoted, never FTS syntax


def test_delete_removes_rows_and_text_from_the_file(tmp_path):
    path = tmp_path / "d.db"
    s = Store(path)
    cid = s.create_conversation("secret")
    s.add_message(cid, "user", "my password is hunter2-unique-marker")
    s.delete_conversation(cid)
    assert s.conversations() == [] and s.search("hunter2") == []
    s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.db.conn.close()
    assert b"hunter2-unique-marker" not in path.read_bytes()


def test_export_import_round_trip_with_branches(store):
    cid = store.create_conversation("Branchy")
    u = store.add_message(cid, "user", "q")
    store.add_message(cid, "assistant", "v1", parent=u)
    a2 = store.add_message(cid, "assistant", "v2", parent=u)
    store.add_message(cid, "user", "follow-up", parent=a2)
    data = store.export_json(cid)
    json.dumps(data)
    new = store.import_json(json.loads(json.dumps(data)))
    assert new != cid
    again = store.export_json(new)
    strip = lambda d: [(m["role"], m["content"], m["status"]) for m in d["messages"]]
    assert strip(again) == strip(data) and again["title"] == "Branchy"
    assert [m["content"] for m in store.active_thread(new)] == ["q", "v2", "follow-up"]
    assert len(store.siblings(store.active_thread(new)[1]["id"])) == 2
    md = store.export_markdown(cid)
    assert md.startswith("# Branchy") and "follow-up" in md and "v1" not in md


def test_comparisons(store):
    off = {"text": "same", "stats": {"decode_tokens_per_s": 10.0}, "timeline": [[0.1, 1]]}
    on = {"text": "same", "stats": {"decode_tokens_per_s": 18.0}, "timeline": [[0.05, 1]]}
    store.add_comparison(None, "p", "m1", {"temperature": 0}, off, on)
    rows = store.comparisons("m1")
    assert rows[0]["identical"] and rows[0]["speedup"] == pytest.approx(1.8)
    assert store.comparisons("other") == []


def test_settings(store):
    assert store.get_setting("temperature", 0.7) == 0.7
    store.set_setting("temperature", 0.2)
    assert store.get_setting("temperature") == 0.2

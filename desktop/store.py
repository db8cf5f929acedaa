"""Chats in SQLite: conversations, messages as a tree, speed comparisons. No Qt here.

One database file in the user data folder (platformdirs; `MOEDESK_HOME` overrides it), WAL mode,
`secure_delete` so a deleted chat's text is gone from the file, FTS5 over message text, a schema
version with migrations. The GUI thread is the only writer.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import sqlite_utils

SCHEMA_VERSION = 1
STATUSES = ("complete", "streaming", "cancelled", "error", "interrupted")
CUT_OFF = {"cancelled": "reply stopped by the user", "error": "reply ended by an error",
           "interrupted": "reply interrupted: the model worker or the app stopped", "streaming": "reply incomplete"}


def data_dir() -> Path:
    home = os.environ.get("MOEDESK_HOME")
    if home:
        return Path(home)
    import platformdirs
    return Path(platformdirs.user_data_dir("moedesk", appauthor=False))


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class Store:
    def __init__(self, path: str | Path | None = None):
        if path is None:
            folder = data_dir()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "moedesk.db"
        self.path = Path(path) if path != ":memory:" else None
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        if self.path is not None:
            self.db.enable_wal()
        self.db.execute("PRAGMA secure_delete = ON")
        self.db.execute("PRAGMA foreign_keys = ON")
        self.migrate()

    # ---- schema ----

    def schema_version(self) -> int:
        if "meta" not in self.db.table_names():
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer moedesk (schema {version}); update moedesk")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            with self.db.conn:
                MIGRATIONS[step](self.db)
                self.db["meta"].upsert({"key": "schema_version", "value": str(step)}, pk="key")

    # ---- settings ----

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [f"setting:{key}"]).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        self.db["meta"].upsert({"key": f"setting:{key}", "value": json.dumps(value)}, pk="key")

    # ---- conversations ----

    def create_conversation(self, title: str = "New chat") -> str:
        cid = new_id()
        self.db["conversations"].insert({"id": cid, "title": title, "created_at": now(), "updated_at": now(),
                                         "active_leaf": None})
        return cid

    def conversations(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM conversations ORDER BY updated_at DESC"))

    def conversation(self, cid: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM conversations WHERE id = ?", [cid]))
        return rows[0] if rows else None

    def rename_conversation(self, cid: str, title: str) -> None:
        self.db["conversations"].update(cid, {"title": title.strip() or "Untitled", "updated_at": now()})

    def delete_conversation(self, cid: str) -> None:
        """Rows and their text leave the file: secure_delete overwrites, FTS triggers clean the index."""
        with self.db.conn:
            self.db.execute("DELETE FROM comparisons WHERE conversation_id = ?", [cid])
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", [cid])
            self.db.execute("DELETE FROM conversations WHERE id = ?", [cid])
        self.db.execute("INSERT INTO messages_fts(messages_fts) VALUES('optimize')")

    def touch(self, cid: str) -> None:
        self.db["conversations"].update(cid, {"updated_at": now()})

    # ---- messages ----

    def add_message(self, cid: str, role: str, content: str, parent: str | None = None,
                    status: str = "complete", model: str | None = None, settings: dict | None = None) -> str:
        assert status in STATUSES
        mid = new_id()
        with self.db.conn:
            self.db["messages"].insert({
                "id": mid, "conversation_id": cid, "parent_id": parent, "role": role, "content": content,
                "status": status, "model": model, "settings": json.dumps(settings or {}), "stats": "{}",
                "created_at": now(), "updated_at": now()})
            self.db["conversations"].update(cid, {"active_leaf": mid, "updated_at": now()})
        return mid

    def update_content(self, mid: str, content: str) -> None:
        """A streaming reply's text so far (called in batches, not per token)."""
        self.db["messages"].update(mid, {"content": content, "updated_at": now()})

    def finish_message(self, mid: str, content: str, status: str, stats: dict | None = None) -> None:
        assert status in STATUSES
        self.db["messages"].update(mid, {"content": content, "status": status, "stats": json.dumps(stats or {}),
                                         "updated_at": now()})

    def message(self, mid: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM messages WHERE id = ?", [mid]))
        return _decode(rows[0]) if rows else None

    def thread(self, leaf: str | None) -> list[dict]:
        """Messages from the root down to `leaf`."""
        out = []
        while leaf:
            m = self.message(leaf)
            if m is None:
                break
            out.append(m)
            leaf = m["parent_id"]
        return out[::-1]

    def active_thread(self, cid: str) -> list[dict]:
        conv = self.conversation(cid)
        return self.thread(conv["active_leaf"]) if conv else []

    def siblings(self, mid: str) -> list[dict]:
        """The versions of a message: all messages with the same parent and role, oldest first."""
        m = self.message(mid)
        if m is None:
            return []
        if m["parent_id"] is None:
            rows = self.db.query("SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS NULL "
                                 "AND role = ? ORDER BY created_at, rowid", [m["conversation_id"], m["role"]])
        else:
            rows = self.db.query("SELECT * FROM messages WHERE parent_id = ? AND role = ? ORDER BY created_at, rowid",
                                 [m["parent_id"], m["role"]])
        return [_decode(r) for r in rows]

    def deepest_leaf(self, mid: str) -> str:
        """Follow the newest child down from `mid`: the leaf to show when switching to that version."""
        while True:
            row = self.db.execute("SELECT id FROM messages WHERE parent_id = ? ORDER BY created_at DESC, rowid DESC "
                                  "LIMIT 1", [mid]).fetchone()
            if row is None:
                return mid
            mid = row[0]

    def set_active_leaf(self, cid: str, leaf: str) -> None:
        self.db["conversations"].update(cid, {"active_leaf": leaf})

    def streaming_conversation(self) -> str | None:
        """The chat whose reply a crash cut off most recently (a reply still marked 'streaming')."""
        row = self.db.execute("SELECT conversation_id FROM messages WHERE status = 'streaming' "
                              "ORDER BY updated_at DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def mark_interrupted(self) -> int:
        """At start-up: replies still 'streaming' were cut off by a crash; keep their text, say so."""
        cur = self.db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
        return cur.rowcount

    # ---- search ----

    def search(self, query: str, limit: int = 50) -> list[dict]:
        """Full-text search over all messages; each hit names its conversation."""
        terms = " ".join('"' + t.replace('"', '""') + '"' for t in query.split())
        if not terms:
            return []
        sql = ("SELECT m.id, m.conversation_id, m.role, snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet, "
               "c.title FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid "
               "JOIN conversations c ON c.id = m.conversation_id WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?")
        return list(self.db.query(sql, [terms, limit]))

    # ---- comparisons ----

    def add_comparison(self, cid: str | None, prompt: str, model: str, settings: dict, off: dict, on: dict) -> str:
        """off/on: {"text", "stats", "timeline"} of the two runs."""
        rid = new_id()
        off_tps, on_tps = off["stats"].get("decode_tokens_per_s"), on["stats"].get("decode_tokens_per_s")
        self.db["comparisons"].insert({
            "id": rid, "conversation_id": cid, "prompt": prompt, "model": model, "settings": json.dumps(settings),
            "off": json.dumps(off), "on": json.dumps(on), "identical": int(off["text"] == on["text"]),
            "speedup": (on_tps / off_tps) if off_tps and on_tps else None, "created_at": now()})
        return rid

    def comparisons(self, model: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM comparisons", []
        if model:
            sql, args = sql + " WHERE model = ?", [model]
        rows = self.db.query(sql + " ORDER BY created_at", args)
        return [{**r, "settings": json.loads(r["settings"]), "off": json.loads(r["off"]), "on": json.loads(r["on"]),
                 "identical": bool(r["identical"])} for r in rows]

    # ---- export / import ----

    def export_json(self, cid: str) -> dict:
        conv = self.conversation(cid)
        rows = self.db.query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY created_at, rowid", [cid])
        return {"format": "moedesk-conversation", "version": 1, "title": conv["title"],
                "created_at": conv["created_at"], "active_leaf": conv["active_leaf"],
                "messages": [{k: v for k, v in _decode(r).items() if k != "conversation_id"} for r in rows]}

    def import_json(self, data: dict) -> str:
        if data.get("format") != "moedesk-conversation":
            raise ValueError("not a moedesk conversation export")
        cid = self.create_conversation(data.get("title") or "Imported chat")
        ids = {m["id"]: new_id() for m in data["messages"]}  # fresh ids: importing twice makes two copies
        with self.db.conn:
            for m in data["messages"]:
                self.db["messages"].insert({
                    "id": ids[m["id"]], "conversation_id": cid, "parent_id": ids.get(m.get("parent_id")),
                    "role": m["role"], "content": m["content"], "status": m.get("status", "complete"),
                    "model": m.get("model"), "settings": json.dumps(m.get("settings") or {}),
                    "stats": json.dumps(m.get("stats") or {}), "created_at": m.get("created_at", now()),
                    "updated_at": m.get("updated_at", now())})
            self.db["conversations"].update(cid, {"active_leaf": ids.get(data.get("active_leaf"))})
        return cid

    def export_markdown(self, cid: str) -> str:
        conv = self.conversation(cid)
        parts = [f"# {conv['title']}\n"]
        for m in self.active_thread(cid):
            parts.append(f"## {m['role'].capitalize()}\n\n{m['content']}\n")
            if m["role"] == "assistant" and m["status"] in CUT_OFF:
                parts.append(f"*[{CUT_OFF[m['status']]}]*\n")
            s = m["stats"]
            if m["role"] == "assistant" and s.get("decode_tokens_per_s"):
                parts.append(f"*{s.get('generated_tokens', 0)} tokens, {s['decode_tokens_per_s']:.1f} tok/s*\n")
        return "\n".join(parts)


def export_filename(title: str, extension: str) -> str:
    """A file name for a chat's export: its title, without characters file systems refuse."""
    stem = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', " ", title)
    stem = re.sub(r"\s+", " ", stem).strip(" .")[:80].rstrip(" .") or "chat"
    return f"{stem}.{extension}"


def documents_dir() -> Path:
    """Where exports go by default: the user's documents folder (platformdirs), else home."""
    import platformdirs
    folder = Path(platformdirs.user_documents_dir())
    return folder if folder.is_dir() else Path.home()


def _decode(row: dict) -> dict:
    return {**row, "settings": json.loads(row.get("settings") or "{}"), "stats": json.loads(row.get("stats") or "{}")}


def _migrate_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db["conversations"].create({"id": str, "title": str, "created_at": float, "updated_at": float,
                                "active_leaf": str}, pk="id", if_not_exists=True)
    db["messages"].create({"id": str, "conversation_id": str, "parent_id": str, "role": str, "content": str,
                           "status": str, "model": str, "settings": str, "stats": str, "created_at": float,
                           "updated_at": float}, pk="id", foreign_keys=[("conversation_id", "conversations", "id")],
                          if_not_exists=True)
    db["messages"].create_index(["conversation_id"], if_not_exists=True)
    db["messages"].create_index(["parent_id"], if_not_exists=True)
    db["messages"].enable_fts(["content"], create_triggers=True, tokenize="unicode61")
    db["comparisons"].create({"id": str, "conversation_id": str, "prompt": str, "model": str, "settings": str,
                              "off": str, "on": str, "identical": int, "speedup": float, "created_at": float},
                             pk="id", if_not_exists=True)


MIGRATIONS = {1: _migrate_1}

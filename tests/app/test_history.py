"""The history store: migrations, FTS search, exports, and kill -9 mid-reply."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from app import chat_export
from app.history import MIGRATIONS, HistoryError, HistoryStore


@pytest.fixture
def store(tmp_path):
    s = HistoryStore(tmp_path / "h.db")
    yield s
    s.close()


def test_migrations_from_empty_and_idempotent(tmp_path):
    s = HistoryStore(tmp_path / "h.db")
    names = [r[0] for r in s.db.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == [n for n, _ in MIGRATIONS]
    assert s.migrate() == []  # nothing left to apply
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s.close()


def test_later_migration_applies_to_existing_data(tmp_path):
    """A database made before FTS existed gets its old messages indexed."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0][1])
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    db.execute("INSERT INTO _migrations VALUES (?, 0)", (MIGRATIONS[0][0],))
    db.execute("INSERT INTO chats VALUES (1, 'old', NULL, '', 0, 0)")
    db.execute("INSERT INTO messages (chat_id, role, content, created) VALUES (1, 'user', 'legacy zebra text', 0)")
    db.commit()
    db.close()
    s = HistoryStore(path)
    assert [h.chat_title for h in s.search("zebra")] == ["old"]
    s.close()


def test_chats_crud_and_ordering(store):
    a = store.new_chat(model="m")
    b = store.new_chat()
    store.add_message(a.id, "user", "hello")
    assert [c.id for c in store.chats()] == [a.id, b.id]  # a was active last
    store.update_chat(b.id, title="Renamed")
    assert store.chat(b.id).title == "Renamed"
    store.delete_chat(a.id)
    assert [c.id for c in store.chats()] == [b.id]
    assert store.messages(a.id) == []  # cascade
    with pytest.raises(HistoryError, match="no chat with id"):
        store.chat(a.id)


def test_fts_search_survives_hostile_queries(store):
    c = store.new_chat(title="Rust talk")
    store.add_message(c.id, "user", "How do lifetimes work in Rust?")
    store.add_message(c.id, "assistant", 'Use "C++" style RAII; NEAR AND OR are words here.')
    assert [h.role for h in store.search("lifetimes")] == ["user"]
    assert store.search("lifetimes")[0].snippet.count("[lifetimes]") == 1
    for q in ['"C++"', "NEAR(", "AND OR", "*", "a:b", "'; DROP TABLE chats; --"]:
        store.search(q)  # never an FTS5 syntax error
    assert store.search("C++")
    assert store.search("") == []
    store.delete_messages_from(c.id, store.messages(c.id)[0].id)
    assert store.search("lifetimes") == []  # the index follows deletes


def test_exports(store):
    c = store.new_chat(title="Export me", model="smollm2-135m", system_prompt="Be terse.")
    store.add_message(c.id, "user", "hi [bold]there[/]")
    store.add_message(c.id, "assistant", "hello", model="smollm2-135m", sampling={"temperature": 0.0},
                      prompt_tokens=10, completion_tokens=2, ttft_s=0.1, tokens_per_s=50.0)
    store.add_message(c.id, "assistant", "partial", status="incomplete")
    md = chat_export.as_markdown(store, c.id)
    assert md.startswith("# Export me") and "## System\n\nBe terse." in md
    assert "hi [bold]there[/]" in md and "## Assistant (incomplete)" in md
    data = json.loads(json.dumps(chat_export.as_json(store, c.id)))
    assert data["chat"]["title"] == "Export me"
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "assistant"]
    assert data["messages"][1]["sampling"] == {"temperature": 0.0}
    assert data["messages"][2]["status"] == "incomplete"


def test_bad_role_is_refused(store):
    c = store.new_chat()
    with pytest.raises(sqlite3.IntegrityError):
        store.add_message(c.id, "wizard", "x")


WRITER = r"""
import sys, threading
from app.chat import ChatController
from app.config import Settings
from app.history import HistoryStore
ctl = ChatController(HistoryStore(), Settings(temperature=0.0, max_tokens=400, n_ctx=1024))
ctl.load_model("smollm2-135m")
for i in range(3):
    for ev in ctl.send(f"Say hello number {i}."):
        pass
    print("committed", i, flush=True)
for ev in ctl.send("Write a very long story about a dragon and a castle."):
    if getattr(ev, "text", ""):
        print("streaming", flush=True)
"""


def test_sigkill_mid_reply_keeps_committed_messages(crofter_home):
    proc = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    committed, streamed = 0, 0
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        committed += line.startswith("committed")
        streamed += line.startswith("streaming")
        if streamed >= 5 or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed == 3 and streamed >= 5
    db = sqlite3.connect(crofter_home / "history.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    db.close()
    # Three full turns, then the last question with no half-saved reply after it.
    assert [r[0] for r in rows] == ["user", "assistant"] * 3 + ["user"]
    assert rows[-1][1].startswith("Write a very long story")
    assert all(r[2] == "complete" for r in rows)
    s = HistoryStore()  # and it opens again normally
    assert len(s.messages(s.chats()[0].id)) == 7
    s.close()

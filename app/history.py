"""The chat history store: SQLite (WAL, synchronous=FULL), versioned migrations, FTS5 search.

Durability rules: a message is written in one transaction when it is complete
(or, for a reply the user stopped, marked ``incomplete``); a reply that was
streaming when the process died is simply absent. With WAL and synchronous=FULL a
committed message survives kill -9 and power loss. Several crofter processes may share the
file: writes take SQLite's write lock (BEGIN IMMEDIATE) and wait up to 10 s for it.

Faults, each a one-line HistoryError naming the file: a database written by a newer crofter
(refused, nothing changed; an older one is migrated after a copy ``history.db.bak-<version>``
is made); a ``-wal`` deleted after a crash while ``-shm`` says it held commits; a disk that
fills (the message is not saved, everything committed before stays); a folder that cannot be
written (the history opens read-only: list, show, search and export work, changes are refused).

    >>> store = HistoryStore()                                        # doctest: +SKIP
    >>> chat = store.new_chat(model="smollm2-135m")
    >>> store.add_message(chat.id, "user", "What is GGUF?")
    >>> store.search("GGUF")[0].snippet
    'What is [GGUF]?'
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from models import paths
from models.sqlite_wal import set_wal
from rag import sqlitedb

# Ordered, named, append-only: a migration once shipped is never edited.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_chats_and_messages",
        """
        CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            model TEXT,
            system_prompt TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            updated REAL NOT NULL
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            model TEXT,
            sampling TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_s REAL,
            tokens_per_s REAL,
            status TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'incomplete')),
            created REAL NOT NULL
        );
        CREATE INDEX messages_by_chat ON messages(chat_id, id);
        """,
    ),
    (
        "002_fts5_search",
        """
        CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id');
        INSERT INTO messages_fts(rowid, content) SELECT id, content FROM messages;
        CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END;
        CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END;
        CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END;
        """,
    ),
    (
        "003_documents",
        """
        ALTER TABLE chats ADD COLUMN collections TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE messages ADD COLUMN sources TEXT;
        """,
    ),
    (
        "004_reasoning_traces",
        """
        ALTER TABLE messages ADD COLUMN thinking TEXT;
        """,
    ),
    (
        "005_alternatives_and_marks",
        """
        CREATE TABLE alternatives (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            prompt_id INTEGER NOT NULL,
            content TEXT NOT NULL,
            model TEXT,
            thinking TEXT,
            created REAL NOT NULL
        );
        CREATE INDEX alternatives_by_prompt ON alternatives(chat_id, prompt_id, id);
        ALTER TABLE messages ADD COLUMN mark INTEGER CHECK (mark IN (-1, 1));
        ALTER TABLE messages ADD COLUMN preferred INTEGER NOT NULL DEFAULT 0;
        """,
    ),
]


class HistoryError(Exception):
    """A chat or message does not exist, or the database cannot be used."""


class HistoryReadOnly(HistoryError):
    """The history can be read but not changed (its folder cannot be written)."""


@dataclass
class Chat:
    id: int
    title: str
    model: str | None
    system_prompt: str
    created: float
    updated: float
    collections: list = field(default_factory=list)  # document collections attached to the chat


@dataclass
class Message:
    id: int
    chat_id: int
    role: str
    content: str
    model: str | None = None
    sampling: dict | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    status: str = "complete"
    created: float = 0.0
    sources: list | None = None  # cited document passages of a grounded answer
    thinking: str | None = None  # the reply's reasoning trace, kept apart from its content
    mark: int | None = None  # the user's thumbs: 1 up, -1 down
    preferred: int = 0  # 1: the user prefers this reply over its alternatives


@dataclass
class Alternative:
    """An earlier reply to the user message `prompt_id`, set aside by a regenerate."""

    id: int
    chat_id: int
    prompt_id: int
    content: str
    model: str | None
    thinking: str | None
    created: float


@dataclass
class Hit:
    chat_id: int
    chat_title: str
    message_id: int
    role: str
    snippet: str


def fts_query(text: str) -> str:
    """User text as an FTS5 query of quoted terms: `C++ "x"` cannot break the syntax."""
    terms = [t.replace('"', '""') for t in text.split()]
    return " ".join(f'"{t}"' for t in terms if t)


class HistoryStore:
    """All chats, in ``<data dir>/history.db``. Safe to share between threads."""

    def __init__(self, path: Path | None = None):
        self.path = path or paths.data_dir() / "history.db"
        self._lock = threading.RLock()
        self.read_only: str | None = None  # why the history cannot be changed, when it cannot
        lost = sqlitedb.lost_wal_frames(self.path)
        if lost:
            raise HistoryError(f"{sqlitedb.lost_wal_message(self.path, lost)}; to open the history as it is, move "
                               f"{self.path.name}-shm out of {self.path.parent}")
        self.db = None
        try:
            try:
                self.db = self._connect()
                set_wal(self.db)
            except sqlite3.OperationalError as exc:
                if sqlitedb.writable(self.path.parent) or not self.path.exists():
                    raise
                if self.db is not None:
                    self.db.close()
                self.read_only = f"{self.path.parent} cannot be written ({exc})"
                self.db = sqlitedb.open_readonly(self.path)
            self.db.row_factory = sqlite3.Row
            sqlitedb.refuse_newer(self.db, self.path, MIGRATIONS, "_migrations")
            if self.read_only:
                if sqlitedb.schema_version(self.db, "_migrations") < len(MIGRATIONS):
                    raise HistoryError(f"{self.path} needs upgrading, but {self.read_only}")
            else:
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self.migrate()
        except sqlitedb.SchemaError as exc:
            self.db.close()
            raise HistoryError(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            if self.db is not None:
                self.db.close()
            raise HistoryError(f"{self.path}: cannot open the history database ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        # timeout=10 is SQLite's busy timeout: another crofter's write waits, it never fails at once.
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)

    def migrate(self) -> list[str]:
        """Apply pending migrations in order (after a backup of an existing file); the names applied."""
        with self._lock:
            return sqlitedb.migrate(self.db, self.path, MIGRATIONS, "_migrations")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _tx(self, sql_params: list[tuple[str, tuple]]) -> list[sqlite3.Cursor]:
        """One transaction; a disk that is full or read-only becomes a HistoryError, nothing half-written."""
        if self.read_only:
            raise HistoryReadOnly(f"{self.path} is read-only: {self.read_only}; nothing was saved")
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    out = [self.db.execute(sql, params) for sql, params in sql_params]
                    self.db.execute("COMMIT")
                    return out
                except BaseException:
                    # SQLite rolls back by itself on SQLITE_FULL and I/O errors.
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise HistoryError(f"{self.path}: could not save ({_why(exc)}); nothing was saved") from None

    # -- chats -----------------------------------------------------------
    def new_chat(self, title: str = "New chat", model: str | None = None, system_prompt: str = "") -> Chat:
        now = time.time()
        (cur,) = self._tx([("INSERT INTO chats (title, model, system_prompt, created, updated) VALUES (?, ?, ?, ?, ?)",
                            (title, model, system_prompt, now, now))])
        return self.chat(cur.lastrowid)

    def chat(self, chat_id: int) -> Chat:
        with self._lock:
            row = self.db.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no chat with id {chat_id} (see `crofter chats list`)")
        return _chat(row)

    def chats(self) -> list[Chat]:
        """Every chat, most recently active first."""
        with self._lock:
            rows = self.db.execute("SELECT * FROM chats ORDER BY updated DESC, id DESC").fetchall()
        return [_chat(r) for r in rows]

    def update_chat(self, chat_id: int, **fields) -> Chat:
        """Change title, model, system_prompt or collections (a list of names)."""
        allowed = {"title", "model", "system_prompt", "collections"}
        bad = set(fields) - allowed
        if bad:
            raise HistoryError(f"cannot change {sorted(bad)}")
        self.chat(chat_id)
        if "collections" in fields:
            fields["collections"] = json.dumps(list(fields["collections"]))
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._tx([(f"UPDATE chats SET {sets}, updated = ? WHERE id = ?", (*fields.values(), time.time(), chat_id))])
        return self.chat(chat_id)

    def delete_chat(self, chat_id: int) -> None:
        self.chat(chat_id)
        self._tx([("DELETE FROM chats WHERE id = ?", (chat_id,))])

    # -- messages --------------------------------------------------------
    def add_message(self, chat_id: int, role: str, content: str, **meta) -> Message:
        """Append a message (one transaction); `meta` holds the Message fields after content."""
        for key in ("sampling", "sources"):
            if meta.get(key) is not None:
                meta[key] = json.dumps(meta[key])
        cols = ["chat_id", "role", "content", "created", *meta]
        now = time.time()
        cur, _ = self._tx([
            (f"INSERT INTO messages ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
             (chat_id, role, content, now, *meta.values())),
            ("UPDATE chats SET updated = ? WHERE id = ?", (now, chat_id)),
        ])
        return self.message(cur.lastrowid)

    def message(self, message_id: int) -> Message:
        with self._lock:
            row = self.db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no message with id {message_id}")
        return _message(row)

    def messages(self, chat_id: int) -> list[Message]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,)).fetchall()
        return [_message(r) for r in rows]

    def delete_messages_from(self, chat_id: int, message_id: int) -> int:
        """Delete a message and every later one in its chat (edit-and-resend, regenerate), and
        the alternative replies to the user messages deleted."""
        cur, _ = self._tx([("DELETE FROM messages WHERE chat_id = ? AND id >= ?", (chat_id, message_id)),
                           ("DELETE FROM alternatives WHERE chat_id = ? AND prompt_id >= ?", (chat_id, message_id))])
        return cur.rowcount

    # -- alternatives and marks (preference data from the chats) ------------
    def set_aside(self, reply: Message, prompt_id: int) -> None:
        """Keep `reply` as an alternative answer to `prompt_id` (unless the same text is kept
        already), then delete it and what followed."""
        self._tx([("INSERT INTO alternatives (chat_id, prompt_id, content, model, thinking, created) SELECT ?, ?, ?, ?, ?, ? "
                   "WHERE NOT EXISTS (SELECT 1 FROM alternatives WHERE chat_id = ? AND prompt_id = ? AND content = ?)",
                   (reply.chat_id, prompt_id, reply.content, reply.model, reply.thinking, time.time(),
                    reply.chat_id, prompt_id, reply.content)),
                  ("DELETE FROM messages WHERE chat_id = ? AND id >= ?", (reply.chat_id, reply.id))])

    def alternatives(self, chat_id: int, prompt_id: int) -> list[Alternative]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM alternatives WHERE chat_id = ? AND prompt_id = ? ORDER BY id",
                                   (chat_id, prompt_id)).fetchall()
        return [Alternative(**dict(r)) for r in rows]

    def rotate(self, reply: Message, alternatives: list[Alternative], step: int = 1) -> Message:
        """Browse: the next (step 1) or previous (-1) alternative takes `reply`'s place and the
        rest move round, in one transaction, so repeated steps visit every reply in turn. The
        reply's mark and preference stay with the text they were given to: cleared here."""
        ring = [(reply.content, reply.model, reply.thinking)] + [(a.content, a.model, a.thinking) for a in alternatives]
        ring = ring[step % len(ring):] + ring[:step % len(ring)]
        (content, model, thinking), rest = ring[0], ring[1:]
        self._tx([("UPDATE messages SET content = ?, model = ?, thinking = ?, mark = NULL, preferred = 0 WHERE id = ?",
                   (content, model, thinking, reply.id))]
                 + [("UPDATE alternatives SET content = ?, model = ?, thinking = ? WHERE id = ?", (*r, a.id))
                    for r, a in zip(rest, alternatives)])
        return self.message(reply.id)

    def mark(self, message_id: int, mark: int | None = None, preferred: bool | None = None) -> Message:
        """Thumbs up (1), down (-1) or none (None); `preferred`: over the reply's alternatives."""
        m = self.message(message_id)
        if m.role != "assistant":
            raise HistoryError(f"message {message_id} is not a reply: only replies are marked")
        self._tx([("UPDATE messages SET mark = ?, preferred = ? WHERE id = ?",
                   (mark, int(m.preferred if preferred is None else preferred), message_id))])
        return self.message(message_id)

    # -- search and export ----------------------------------------------
    def search(self, text: str, limit: int = 50) -> list[Hit]:
        """Full-text search over every message of every chat, best match first."""
        q = fts_query(text)
        if not q:
            return []
        with self._lock:
            rows = self.db.execute(
                """SELECT m.chat_id, c.title, m.id, m.role,
                          snippet(messages_fts, 0, '[', ']', '…', 12) AS snip
                   FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid JOIN chats c ON c.id = m.chat_id
                   WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?""",
                (q, limit),
            ).fetchall()
        return [Hit(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def _message(row: sqlite3.Row) -> Message:
    d = dict(row)
    for key in ("sampling", "sources"):
        if d.get(key):
            d[key] = json.loads(d[key])
    return Message(**d)


def _chat(row: sqlite3.Row) -> Chat:
    d = dict(row)
    d["collections"] = json.loads(d.get("collections") or "[]")
    return Chat(**d)


def _why(exc: sqlite3.OperationalError) -> str:
    text = str(exc)
    if "disk is full" in text or "disk I/O error" in text:
        return f"{text}: free some space; every message saved before is kept"
    return text

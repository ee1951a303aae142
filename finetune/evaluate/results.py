"""The results store: every evaluation row ever measured, with the model's file hash.

One SQLite file, ``<data dir>/eval/results.sqlite`` (WAL). A run is one ``crofter eval`` call;
its rows carry the model's name as given, the sha256 of its bytes, the suite, task, metric,
value, stderr and item count; the run carries its date (ISO-8601 UTC), the crofter version
and a JSON ``extra`` (num_fewshot, limit, ...). Lookups go by name or by hash prefix, so a
model evaluated as ``./out/model.gguf`` and later compared as ``mymodel`` is the same model
when its bytes are the same.

    >>> store = ResultStore()                                              # doctest: +SKIP
    >>> h = store.hash_of("model.gguf")                                    # doctest: +SKIP
    >>> store.add([Row("model.gguf", "perplexity", "wiki", "ppl", 21.4, 0.3, 4096)],
    ...           {"model.gguf": h}, "0.4.0", {"ctx": 512})                # doctest: +SKIP
    1

Schema changes are an ordered list of named migrations, ``PRAGMA user_version`` counting those
applied. A file from a newer crofter, or one that is not a database (or not ours), is refused
with its name and never written to.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from models import paths
from models.sqlite_wal import set_wal

from .rows import SUITES, EvalError, Row

BLOCK = 1 << 20  # files are hashed in 1 MiB blocks: a 500 MB GGUF never sits in memory

MIGRATIONS: list[tuple[str, str]] = [
    ("001_results", """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created TEXT NOT NULL,              -- ISO-8601 UTC
            crofter_version TEXT NOT NULL,
            extra TEXT NOT NULL DEFAULT '{}'    -- JSON: num_fewshot, limit, ...
        );
        CREATE TABLE results (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            model TEXT NOT NULL,
            model_hash TEXT NOT NULL,
            suite TEXT NOT NULL,
            task TEXT NOT NULL,
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            stderr REAL,
            n INTEGER NOT NULL
        );
        CREATE INDEX results_model ON results(model);
        CREATE INDEX results_hash ON results(model_hash);
        CREATE TABLE file_hashes (
            path TEXT PRIMARY KEY,              -- resolved
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            sha256 TEXT NOT NULL
        );
    """),
]
OUR_TABLES = {"runs", "results", "file_hashes", "sqlite_sequence"}
HEX = re.compile(r"[0-9a-fA-F]{8,64}")
# What of an HF checkpoint or adapter folder makes the model: weights, configs, tokenizer.
TOKENIZER_FILES = {"merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model"}


@dataclass(frozen=True)
class StoredRow(Row):
    """A `Row` as the store keeps it: with its run, the model's hash, the date and version."""
    run_id: int = 0
    model_hash: str = ""
    created: str = ""
    crofter_version: str = ""
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ModelSummary:
    name: str         # as it was given to `crofter eval`
    model_hash: str   # sha256 hex
    last: str         # ISO-8601 UTC of its newest run
    rows: int


@dataclass(frozen=True)
class RunSummary:
    id: int
    created: str
    crofter_version: str
    extra: dict
    models: tuple[str, ...]
    rows: int


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder that the hash covers, sorted (hidden folders skipped)."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        name = p.name.lower()
        if (p.suffix.lower() in (".safetensors", ".json", ".tiktoken") or name.startswith("tokenizer")
                or name in TOKENIZER_FILES):
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def model_hash(path: str | os.PathLike, adapter: str | os.PathLike | None = None, *, file_hash=None) -> str:
    """sha256 hex that names a model by its bytes.

    A file (GGUF or any other): sha256 of its bytes. A folder (HF checkpoint): sha256 over the
    sorted ``relative/path NUL sha256`` lines of its safetensors, JSON and tokenizer files. With
    an adapter (a folder or a file), sha256 of both hashes. `file_hash` hashes one file
    (`file_sha256` unless the store passes its cached one)."""
    file_hash = file_hash or file_sha256
    base = _one_hash(Path(path), file_hash)
    if adapter is None:
        return base
    return hashlib.sha256(f"model\0{base}\nadapter\0{_one_hash(Path(adapter), file_hash)}\n".encode()).hexdigest()


def _one_hash(path: Path, file_hash) -> str:
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        raise EvalError(f"{path}: no such model file or folder")
    files = model_files(path)
    if not files:
        raise EvalError(f"{path}: no *.safetensors, *.json or tokenizer files in this folder to identify the model by")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path).as_posix()}\0{file_hash(p)}\n".encode())
    return digest.hexdigest()


def default_path() -> Path:
    return paths.data_dir() / "eval" / "results.sqlite"


def utc_iso(when: datetime | None) -> str:
    """ISO-8601 UTC, to the second (a naive `when` is local time, as Python reads it)."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    """The evaluation results of every model, kept across runs (see the module docstring)."""

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 10.0):
        self.path = Path(path) if path is not None else default_path()
        self.readonly = self.path.exists() and not os.access(self.path.parent, os.W_OK)
        if not self.path.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EvalError(f"{self.path}: cannot create the results store ({exc.strerror})") from exc
        try:
            if self.readonly:  # no -shm can be made here: read what the file holds
                query = "mode=ro" if Path(f"{self.path}-wal").exists() else "mode=ro&immutable=1"
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True,
                                          isolation_level=None, timeout=timeout)
            else:
                self.db = sqlite3.connect(self.path, isolation_level=None, timeout=timeout)
        except sqlite3.Error as exc:
            raise EvalError(f"{self.path}: cannot open the results store ({exc})") from exc
        try:
            self._open()
        except BaseException:
            self.db.close()
            raise

    def _open(self) -> None:
        try:
            # Reading page 1 first: a file that is not a database fails here, before anything is written.
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.OperationalError as exc:  # locked, cannot open, I/O: the file may be fine
            raise EvalError(f"{self.path}: cannot read the results store ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            raise EvalError(f"{self.path}: not a crofter results database, or a damaged one ({exc}); "
                            "the file was left as it is") from exc
        if version > len(MIGRATIONS):
            raise EvalError(
                f"{self.path} was written by a newer crofter (schema version {version}; this crofter reads version "
                f"{len(MIGRATIONS)} or older): upgrade crofter to read it (nothing was changed)")
        if version == 0 and tables - OUR_TABLES:
            raise EvalError(f"{self.path}: an SQLite database of something else (tables {', '.join(sorted(tables))}), "
                            "not a crofter results store; the file was left as it is")
        if self.readonly:
            if version < len(MIGRATIONS):
                raise EvalError(f"{self.path}: the store needs upgrading, but its folder is read-only")
            return
        with self._errors():
            set_wal(self.db)
            self.db.execute("PRAGMA foreign_keys = ON")
            # With a second migration, copy an existing store aside before changing it (F8: migrate after a backup).
            for i, (_name, sql) in enumerate(MIGRATIONS, 1):
                if i > version:
                    with self._transaction():
                        if self.db.execute("PRAGMA user_version").fetchone()[0] < i:  # not done by another process
                            _run_script(self.db, sql)
                            self.db.execute(f"PRAGMA user_version = {i}")

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3's errors as one line naming the file (a damaged page shows up only when read)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise EvalError(f"{self.path}: results store error: {exc}") from exc

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._errors():
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        self.db.close()

    # -- writing ----------------------------------------------------------------------------

    def add(self, rows: Iterable[Row], hashes: dict[str, str], version: str, extra: dict | None = None,
            when: datetime | None = None) -> int:
        """Store one run's rows in one transaction; the new run's id.

        `hashes` maps each row's model name to its `model_hash`; `extra` is kept as JSON."""
        rows = list(rows)
        if not rows:
            raise EvalError("no results to store")
        for r in rows:
            where = f"{r.model} / {r.suite} / {r.task} / {r.metric}"
            if not isinstance(hashes.get(r.model), str) or not hashes[r.model]:
                raise EvalError(f"no model hash given for {r.model!r}")
            if r.suite not in SUITES:
                raise EvalError(f"{where}: unknown suite {r.suite!r} (one of {', '.join(SUITES)})")
            if not isinstance(r.value, (int, float)) or math.isnan(r.value):
                raise EvalError(f"{where}: value {r.value!r} is not a number")
            if r.stderr is not None and (not isinstance(r.stderr, (int, float)) or math.isnan(r.stderr)):
                raise EvalError(f"{where}: stderr {r.stderr!r} is not a number")
        try:
            extra_json = json.dumps(extra or {}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise EvalError(f"run extra is not JSON: {exc}") from exc
        if self.readonly:
            raise EvalError(f"{self.path}: the results store's folder is read-only; nothing was stored")
        with self._errors(), self._transaction():
            run_id = self.db.execute("INSERT INTO runs (created, crofter_version, extra) VALUES (?, ?, ?)",
                                     (utc_iso(when), version, extra_json)).lastrowid
            self.db.executemany(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, r.model, hashes[r.model], r.suite, r.task, r.metric, float(r.value),
                  None if r.stderr is None else float(r.stderr), int(r.n)) for r in rows])
        return run_id

    # -- reading ----------------------------------------------------------------------------

    _SELECT = ("SELECT r.model, r.suite, r.task, r.metric, r.value, r.stderr, r.n, r.run_id, r.model_hash, "
               "u.created, u.crofter_version, u.extra FROM results r JOIN runs u ON u.id = r.run_id")

    def resolve(self, model: str) -> str | None:
        """The model hash that `model` (a stored name, or a hash prefix of >= 8 hex digits) names.

        A name evaluated with several files (it was retrained) means its most recently evaluated
        bytes; None when nothing matches; EvalError when a prefix matches several models."""
        got = self._query("SELECT r.model_hash FROM results r JOIN runs u ON u.id = r.run_id WHERE r.model = ? "
                          "ORDER BY u.created DESC, u.id DESC LIMIT 1", (model,))
        if got:
            return got[0][0]
        if not HEX.fullmatch(model):
            return None
        prefix = model.lower()
        found = [h for (h,) in self._query("SELECT DISTINCT model_hash FROM results WHERE substr(model_hash, 1, ?) = ?",
                                           (len(prefix), prefix))]
        if len(found) > 1:
            raise EvalError(f"hash prefix {model!r} matches {len(found)} models ({', '.join(h[:12] for h in found)}): "
                            "give more digits")
        return found[0] if found else None

    def latest(self, model: str) -> list[StoredRow]:
        """For each (suite, task, metric) the newest stored value of `model` (name or hash prefix).

        Rows of the same bytes stored under another name count too; [] when `model` is unknown."""
        digest = self.resolve(model)
        if digest is None:
            return []
        newest: dict[tuple[str, str, str], StoredRow] = {}
        for t in self._query(f"{self._SELECT} WHERE r.model_hash = ? ORDER BY u.created, u.id", (digest,)):
            row = _stored(t)
            newest[(row.suite, row.task, row.metric)] = row  # later runs overwrite earlier ones
        return list(newest.values())

    def models(self) -> list[ModelSummary]:
        """Every (name, hash) the store knows, newest first."""
        got = self._query("SELECT r.model, r.model_hash, max(u.created), count(*) FROM results r "
                          "JOIN runs u ON u.id = r.run_id GROUP BY r.model, r.model_hash "
                          "ORDER BY max(u.created) DESC, max(u.id) DESC")
        return [ModelSummary(*t) for t in got]

    def runs(self) -> list[RunSummary]:
        """Every run, newest first, with the models it measured and its row count."""
        names: dict[int, dict[str, int]] = {}
        for rid, model in self._query("SELECT run_id, model FROM results ORDER BY rowid"):
            per = names.setdefault(rid, {})
            per[model] = per.get(model, 0) + 1
        got = self._query("SELECT id, created, crofter_version, extra FROM runs ORDER BY created DESC, id DESC")
        return [RunSummary(rid, created, ver, _json(extra), tuple(names.get(rid, {})), sum(names.get(rid, {}).values()))
                for rid, created, ver, extra in got]

    def rows(self, run_id: int) -> list[StoredRow]:
        """The rows of one run, in the order they were stored."""
        return [_stored(t) for t in self._query(f"{self._SELECT} WHERE r.run_id = ? ORDER BY r.rowid", (run_id,))]

    # -- model hashes -----------------------------------------------------------------------

    def hash_of(self, path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
        """`model_hash`, with each file's sha256 cached by (resolved path, size, mtime_ns, inode).

        A file rewritten in place with the same size and the same mtime_ns is served from the
        cache (as make and rsync would); an atomic replace changes the inode."""
        return model_hash(path, adapter, file_hash=self._cached_sha256)

    def _cached_sha256(self, path: Path) -> str:
        resolved = str(Path(path).resolve())
        st = os.stat(resolved)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        got = self._query("SELECT size, mtime_ns, inode, sha256 FROM file_hashes WHERE path = ?", (resolved,))
        if got and tuple(got[0][:3]) == key:
            return got[0][3]
        digest = file_sha256(resolved)
        if not self.readonly:
            try:
                self.db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?)", (resolved, *key, digest))
            except sqlite3.OperationalError:
                pass  # the cache only saves time (a busy or full store must not fail the evaluation)
        return digest

    def cached_hashes(self) -> dict[str, str]:
        """resolved path -> sha256 of every file hash the store remembers."""
        return dict(self._query("SELECT path, sha256 FROM file_hashes"))


def _run_script(db: sqlite3.Connection, sql: str) -> None:
    """The statements of a migration, inside the caller's transaction (executescript would commit)."""
    buf = ""
    for line in sql.strip().splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            db.execute(buf)
            buf = ""
    if buf.strip():
        db.execute(buf)


def _json(text: str) -> dict:
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    return {}


def _stored(t: tuple) -> StoredRow:
    model, suite, task, metric, value, stderr, n, run_id, digest, created, version, extra = t
    return StoredRow(model, suite, task, metric, value, stderr, n, run_id, digest, created, version, _json(extra))

"""SQLite housekeeping shared by crofter's stores (the chat history and the document catalogue).

One mechanism for each job, used by both stores (app/history.py imports it; rag may not
import app, so it lives here, below both):

- ``migrate``: an ordered list of named migrations, each in its own transaction, with
  ``PRAGMA user_version`` = the number applied. Before the first migration that changes
  an existing database, a consistent copy is written next to it as ``<db>.bak-<version>``.
- ``refuse_newer``: a database written by a newer crofter (a migration name this build
  does not know, or a higher user_version) is refused, and nothing is written.
- ``lost_wal_frames``: the ``-wal`` of a crashed process was deleted although ``-shm``
  still says it held commits that were never copied into the database.
- ``open_readonly``: read a WAL database in a folder that cannot be written.

    >>> migrate(db, Path("h.db"), [("001_t", "CREATE TABLE t (x);")], "_migrations")   # doctest: +SKIP
    ['001_t']
"""
from __future__ import annotations

import os
import sqlite3
import struct
import time
from pathlib import Path

Migrations = list[tuple[str, str]]


class SchemaError(Exception):
    """The database was written by a newer crofter, or cannot be brought up to date."""


def split_sql(script: str) -> list[str]:
    """Statements of a migration; sqlite3.complete_statement keeps trigger bodies whole."""
    out, buf = [], ""
    for line in script.strip().splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def _applied(db: sqlite3.Connection, table: str) -> list[str]:
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    if not exists:
        return []
    return [r[0] for r in db.execute(f"SELECT name FROM {table} ORDER BY applied, name")]


def schema_version(db: sqlite3.Connection, table: str) -> int:
    """How many migrations the database has had (user_version, or the count for older files)."""
    return max(db.execute("PRAGMA user_version").fetchone()[0], len(_applied(db, table)))


def refuse_newer(db: sqlite3.Connection, path: Path, migrations: Migrations, table: str) -> None:
    """SchemaError when a newer crofter wrote the database; reads only."""
    known = [n for n, _ in migrations]
    done = _applied(db, table)
    unknown = [n for n in done if n not in known]
    version = schema_version(db, table)
    if unknown or version > len(known):
        what = f"migration {unknown[-1]!r}" if unknown else f"user_version {version}"
        raise SchemaError(
            f"{path} was written by a newer crofter (schema version {version}, {what}); this crofter reads schema "
            f"version {len(known)} or older: install a crofter whose schema is version {version} or newer "
            "(nothing was changed)")


def migrate(db: sqlite3.Connection, path: Path, migrations: Migrations, table: str) -> list[str]:
    """Apply the pending migrations in order; the names applied. `db` is in autocommit mode."""
    refuse_newer(db, path, migrations, table)
    done = set(_applied(db, table))
    if all(n in done for n, _ in migrations):
        return []
    if done:  # an existing database is about to change: keep a copy of it first
        backup(db, Path(f"{path}.bak-{schema_version(db, table)}"))
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    applied = []
    for i, (name, sql) in enumerate(migrations, 1):
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have applied it between our read and this write lock.
            if db.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone() is None:
                for statement in split_sql(sql):
                    db.execute(statement)
                db.execute(f"INSERT INTO {table} VALUES (?, ?)", (name, time.time()))
                db.execute(f"PRAGMA user_version = {i}")
                applied.append(name)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return applied


def backup(db: sqlite3.Connection, dest: Path) -> Path:
    """A consistent copy of `db` (WAL content included) at `dest`, complete or absent; an existing one is kept."""
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    out = sqlite3.connect(tmp)
    try:
        db.backup(out)
    finally:
        out.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    return dest


# The wal-index header at the start of <db>-shm (sqlite's wal.c, WalIndexHdr + WalCkptInfo), in the
# machine's byte order: iVersion u32 @0, isInit u8 @12, mxFrame u32 @16 (frames in the WAL);
# nBackfill u32 @96 (frames already copied into the database).
_WAL_INDEX_VERSION = 3007000


def lost_wal_frames(path: Path) -> int:
    """Committed WAL frames that never reached `path` and whose ``-wal`` file is gone (0: nothing lost)."""
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if wal.exists() or not shm.exists():
        return 0
    try:
        head = shm.read_bytes()[:136]
    except OSError:
        return 0
    if len(head) < 100:
        return 0
    version, = struct.unpack_from("=I", head, 0)
    mx_frame, = struct.unpack_from("=I", head, 16)
    backfilled, = struct.unpack_from("=I", head, 96)
    if version != _WAL_INDEX_VERSION or not head[12]:
        return 0
    return max(0, mx_frame - backfilled)


def lost_wal_message(path: Path, frames: int) -> str:
    return (f"{path}-wal is missing, but {path.name}-shm says it held {frames} committed page(s) not yet copied into "
            f"{path.name}: the last changes before a crash are lost")


def open_readonly(path: Path, timeout: float = 10.0) -> sqlite3.Connection:
    """Read a database whose folder cannot be written (no -shm can be made there).

    With a -wal present (a crash left it) SQLite reads it in mode=ro; without one the file
    holds everything, and immutable=1 reads it with no lock or -shm files at all."""
    uri = path.resolve().as_uri()
    query = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    return sqlite3.connect(f"{uri}?{query}", uri=True, isolation_level=None, check_same_thread=False, timeout=timeout)


def writable(folder: Path) -> bool:
    """Whether new files can be made in `folder` (EROFS and permissions; root passes chmod)."""
    return os.access(folder, os.W_OK)

"""The document store: a SQLite catalogue (files, chunks, FTS5) beside a Chroma collection.

Layout under the store folder (``<data dir>/rag`` by default)::

    lock               flock'ed by the one process that owns the store (pid inside)
    catalog.sqlite3    collections, files (content hash, status), chunks (+ FTS5 index)
    chroma/            Chroma PersistentClient (unless a Chroma server URL is given)

SQLite is the source of truth: a chunk exists when its catalogue row does. Vectors are
written to Chroma *before* the catalogue transaction that commits a file, and each
file's old vectors are deleted by path first, so a process killed anywhere in between
leaves the old version committed and the next ingest redoes the file with no
duplicates. Query results from Chroma are joined back to catalogue rows by id.
"""
from __future__ import annotations

import hashlib
import os
import re
import functools
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import lock
from .schema import MIGRATIONS, _split_sql

CHROMA_PREFIX = "crofter-"
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class RagError(Exception):
    """A document-store problem worth one line to the user."""


class StoreLocked(RagError):
    """Another process owns the store."""


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    embedder: str
    dimension: int
    chunk_size: int
    chunk_overlap: int
    created: float
    files: int = 0
    failed: int = 0
    chunks: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class StoredChunk:
    id: str
    path: str
    idx: int
    page: int | None
    heading: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int
    mtime_ns: int
    status: str
    reason: str | None
    n_chunks: int


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise RagError(f"collection name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting and ending "
                       "with a letter or digit")
    return name


def chunk_id(path: str, sha256: str, idx: int) -> str:
    """Stable per (file path, content, position): re-adding the same chunk is idempotent."""
    return hashlib.sha1(f"{path}\0{sha256}\0{idx}".encode()).hexdigest()


def _chroma_settings():
    from chromadb.config import Settings

    # No telemetry: crofter makes no network calls at run time.
    return Settings(anonymized_telemetry=False, allow_reset=False)


def _locked(method):
    """Serialise a Store method: the app queries from one thread while another ingests."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Store:
    """One process's handle on the document store (it holds the store's lock until close()).

    >>> with Store(tmp_path) as s:                     # doctest: +SKIP
    ...     s.create_collection("docs", "all-MiniLM-L6-v2", 384, 200, 32)
    """

    def __init__(self, root: str | os.PathLike, chroma_url: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.chroma_url = chroma_url
        self._lock = threading.RLock()
        try:
            self._lock_fh = lock.acquire(self.root)
        except lock.StoreLocked as exc:
            raise StoreLocked(str(exc)) from None
        self._chroma = None
        self._collections: dict[str, object] = {}
        try:
            self.db = sqlite3.connect(self.root / "catalog.sqlite3", isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            lock.release(self._lock_fh)
            self._lock_fh = None
            raise RagError(f"document catalogue {self.root / 'catalog.sqlite3'}: {exc}") from None

    # --- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None
        self._collections.clear()
        self._chroma = None
        lock.release(self._lock_fh)
        self._lock_fh = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
        done = {r[0] for r in self.db.execute("SELECT name FROM migrations")}
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(sql):
                    self.db.execute(statement)
                self.db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # --- chroma -----------------------------------------------------------------------------------

    @property
    def chroma(self):
        if self._chroma is None:
            import chromadb

            if self.chroma_url:
                from urllib.parse import urlparse

                u = urlparse(self.chroma_url if "://" in self.chroma_url else f"http://{self.chroma_url}")
                if not u.hostname:
                    raise RagError(f"--chroma-url {self.chroma_url}: expected http://HOST:PORT")
                try:
                    self._chroma = chromadb.HttpClient(host=u.hostname, port=u.port or 8000, ssl=u.scheme == "https",
                                                       settings=_chroma_settings())
                    self._chroma.heartbeat()
                except Exception as exc:
                    self._chroma = None
                    raise RagError(f"cannot reach the Chroma server at {self.chroma_url}: {exc}") from None
            else:
                self._chroma = chromadb.PersistentClient(path=str(self.root / "chroma"), settings=_chroma_settings())
        return self._chroma

    @_locked
    def _vectors(self, name: str):
        col = self._collections.get(name)
        if col is None:
            # embedding_function=None: vectors always come from crofter's embedder, so Chroma
            # never loads (or downloads) a model of its own.
            col = self.chroma.get_or_create_collection(CHROMA_PREFIX + name, embedding_function=None,
                                                       metadata={"hnsw:space": "cosine"})
            self._collections[name] = col
        return col

    # --- collections ------------------------------------------------------------------------------

    @_locked
    def collection(self, name: str) -> CollectionInfo | None:
        row = self.db.execute(
            "SELECT name, embedder, dimension, chunk_size, chunk_overlap, created FROM collections WHERE name = ?",
            (name,)).fetchone()
        if row is None:
            return None
        files, failed = self.db.execute(
            "SELECT COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'failed'), 0) FROM files WHERE collection = ?",
            (name,)).fetchone()
        chunks = self.db.execute("SELECT COUNT(*) FROM chunks WHERE collection = ?", (name,)).fetchone()[0]
        return CollectionInfo(*row, files=files, failed=failed, chunks=chunks)

    def require(self, name: str) -> CollectionInfo:
        info = self.collection(name)
        if info is None:
            have = [c.name for c in self.collections()]
            raise RagError(f"no collection named {name!r}" + (f" (have: {', '.join(have)})" if have else
                                                                 "; create one with `crofter ingest PATH --collection NAME`"))
        return info

    @_locked
    def collections(self) -> list[CollectionInfo]:
        names = [r[0] for r in self.db.execute("SELECT name FROM collections ORDER BY name")]
        return [self.collection(n) for n in names]

    @_locked
    def create_collection(self, name: str, embedder: str, dimension: int, chunk_size: int, chunk_overlap: int) -> CollectionInfo:
        check_name(name)
        self.db.execute("INSERT OR IGNORE INTO collections VALUES (?, ?, ?, ?, ?, ?)",
                        (name, embedder, dimension, chunk_size, chunk_overlap, time.time()))
        self._vectors(name)
        return self.require(name)

    @_locked
    def drop_collection(self, name: str) -> None:
        self.require(name)
        try:
            self.chroma.delete_collection(CHROMA_PREFIX + name)
        except Exception:  # already gone from Chroma (a previous rm was interrupted)
            pass
        self._collections.pop(name, None)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM chunks WHERE collection = ?", (name,))
        self.db.execute("DELETE FROM files WHERE collection = ?", (name,))
        self.db.execute("DELETE FROM collections WHERE name = ?", (name,))
        self.db.execute("COMMIT")

    # --- files ------------------------------------------------------------------------------------

    @_locked
    def file(self, collection: str, path: str) -> FileRecord | None:
        row = self.db.execute(
            "SELECT path, sha256, size, mtime_ns, status, reason, n_chunks FROM files WHERE collection = ? AND path = ?",
            (collection, path)).fetchone()
        return FileRecord(*row) if row else None

    @_locked
    def files(self, collection: str) -> list[FileRecord]:
        return [FileRecord(*r) for r in self.db.execute(
            "SELECT path, sha256, size, mtime_ns, status, reason, n_chunks FROM files WHERE collection = ? ORDER BY path",
            (collection,))]

    @_locked
    def write_files(self, collection: str, batch: list[tuple[FileRecord, list, object]]) -> None:
        """Commit several files at once: (record, chunks, embeddings) each; failed files have no chunks.

        Order matters for crash safety (see the module docstring): Chroma first, then one
        SQLite transaction."""
        paths = [rec.path for rec, _, _ in batch]
        vectors = self._vectors(collection)
        if paths:
            vectors.delete(where={"path": {"$in": paths}})
        ids, embs, metas = [], [], []
        rows = []
        for rec, chunks, emb in batch:
            for ch, vec in zip(chunks, emb if emb is not None else []):
                cid = chunk_id(rec.path, rec.sha256, ch.index)
                ids.append(cid)
                embs.append(vec)
                metas.append({"path": rec.path})
                rows.append((cid, collection, rec.path, ch.index, ch.page, ch.heading, ch.start, ch.end, ch.text))
        if ids:
            step = 2000
            for i in range(0, len(ids), step):
                vectors.add(ids=ids[i:i + step], embeddings=embs[i:i + step], metadatas=metas[i:i + step])
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for rec, _, _ in batch:
                self.db.execute("DELETE FROM chunks WHERE collection = ? AND path = ?", (collection, rec.path))
                self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (collection, rec.path, rec.sha256, rec.size, rec.mtime_ns, rec.status, rec.reason,
                                 rec.n_chunks, now))
            self.db.executemany(
                'INSERT INTO chunks (id, collection, path, idx, page, heading, start, "end", text) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @_locked
    def touch_file(self, collection: str, path: str, mtime_ns: int) -> None:
        """Same content, new mtime: remember it so the next run can skip the hash."""
        self.db.execute("UPDATE files SET mtime_ns = ? WHERE collection = ? AND path = ?", (mtime_ns, collection, path))

    @_locked
    def remove_files(self, collection: str, paths: list[str]) -> None:
        if not paths:
            return
        self._vectors(collection).delete(where={"path": {"$in": paths}})
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("DELETE FROM chunks WHERE collection = ? AND path = ?", [(collection, p) for p in paths])
        self.db.executemany("DELETE FROM files WHERE collection = ? AND path = ?", [(collection, p) for p in paths])
        self.db.execute("COMMIT")

    # --- queries ----------------------------------------------------------------------------------

    @_locked
    def chunks(self, collection: str, ids: list[str]) -> dict[str, StoredChunk]:
        if not ids:
            return {}
        out: dict[str, StoredChunk] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            for r in self.db.execute(
                    f'SELECT id, path, idx, page, heading, start, "end", text FROM chunks '
                    f"WHERE collection = ? AND id IN ({marks})", (collection, *part)):
                out[r[0]] = StoredChunk(*r)
        return out

    @_locked
    def dense(self, collection: str, vector, n: int) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first."""
        col = self._vectors(collection)
        count = col.count()
        if count == 0:
            return []
        res = col.query(query_embeddings=[list(map(float, vector))], n_results=min(n, count), include=["distances"])
        return [(cid, 1.0 - float(d)) for cid, d in zip(res["ids"][0], res["distances"][0])]

    @_locked
    def keyword(self, collection: str, query: str, n: int) -> list[tuple[str, float]]:
        """(chunk id, BM25 score, higher is better) for chunks containing any query term."""
        terms = re.findall(r"\w+", query, flags=re.UNICODE)
        if not terms:
            return []
        # Every term quoted: user text is data, never FTS5 syntax (NEAR, AND, column filters...).
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in dict.fromkeys(terms))
        rows = self.db.execute(
            "SELECT c.id, bm25(chunks_fts) AS s FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
            "WHERE chunks_fts MATCH ? AND c.collection = ? ORDER BY s LIMIT ?", (match, collection, n)).fetchall()
        return [(cid, -float(s)) for cid, s in rows]

    @_locked
    def vector_ids(self, collection: str) -> list[str]:
        """Every id Chroma holds for the collection (consistency checks)."""
        col = self._vectors(collection)
        out: list[str] = []
        total = col.count()
        for off in range(0, total, 1000):
            out.extend(col.get(limit=1000, offset=off, include=[])["ids"])
        return out

    @_locked
    def chunk_ids(self, collection: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE collection = ?", (collection,))]

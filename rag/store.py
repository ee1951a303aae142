"""The document store: a SQLite catalogue (files, chunks, FTS5) beside a Chroma collection.

Layout under the store folder (``<data dir>/rag`` by default)::

    lock               flock'ed by the one process that owns the store (pid inside)
    catalog.sqlite3    collections, files (content hash, status), chunks (+ FTS5 index)
    chroma/            Chroma PersistentClient (unless a Chroma server URL is given)

SQLite is the source of truth: a chunk exists when its catalogue row does. Vectors are written
to Chroma *before* the catalogue transaction that commits a file, and each file's old vectors
are deleted by path first, so a process killed anywhere in between leaves the old version
committed and the next ingest redoes the file with no duplicates. Query results from Chroma
are joined back to catalogue rows by id.

Opening checks the store first (rag/verify.py): a catalogue whose -wal was deleted after a
crash, a damaged catalogue, damaged Chroma files are each refused with one line naming the
file and offering `crofter collections rebuild` (``repair=True``: re-embeds from the chunk
texts kept in the catalogue)."""
from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

from models.sqlite_wal import set_wal

from . import chroma_client, lock, sqlitedb, verify
from .errors import (  # re-exported: callers import them from here
    RagError,
    StoreDamaged,
    StoreLocked,
)
from .records import (  # re-exported: callers import them from here
    CollectionInfo,
    FileRecord,
    StoredChunk,
    check_name,
    chunk_id,
)
from .schema import MIGRATIONS

CHROMA_PREFIX = "crofter-"
_FILE_ROW = "SELECT path, sha256, size, mtime_ns, status, reason, n_chunks FROM files"  # a FileRecord


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

    def __init__(self, root: str | os.PathLike, chroma_url: str | None = None, *, repair: bool = False,
                 hnsw_sync_threshold: int | None = None):
        """`repair`: open a damaged store to rebuild it (a lost catalogue WAL is accepted, Chroma's
        files are not checked). `hnsw_sync_threshold`: new collections persist their vector index
        every that many additions (Chroma's default is 1000; below it Chroma replays its log)."""
        self.root = Path(root)
        self.chroma_url = chroma_url
        self.hnsw_sync_threshold = hnsw_sync_threshold
        self._lock = threading.RLock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fh = lock.acquire(self.root)
        except lock.StoreLocked as exc:
            raise StoreLocked(str(exc)) from None
        except OSError as exc:
            raise RagError(f"the document store {self.root} cannot be written ({exc.strerror})") from None
        self._chroma = None
        self._collections: dict[str, object] = {}
        self.db = None
        try:
            self._open_catalogue(repair)
            damage = [] if repair else self.check()
        except BaseException:
            self.close()
            raise
        if damage:
            self.close()
            raise StoreDamaged(verify.damage_message(damage), damage)

    def check(self) -> list:
        """Damage in the embedded Chroma files (rag.verify), read without opening Chroma."""
        return [] if self.chroma_url else verify.check_chroma(self.root / "chroma", CHROMA_PREFIX)

    def _open_catalogue(self, repair: bool) -> None:
        path = self.root / "catalog.sqlite3"
        lost = sqlitedb.lost_wal_frames(path)
        if lost and not repair:
            raise StoreDamaged(f"document catalogue: {sqlitedb.lost_wal_message(path, lost)}; run `crofter "
                               "collections rebuild` to accept the loss and re-embed every collection, then "
                               "`crofter ingest` your folders again", [verify.Damage(path, "WAL lost", None)])
        if lost:
            verify.set_aside(Path(f"{path}-shm"))
        self.lost_catalogue_wal = bool(lost)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            check = [r[0] for r in self.db.execute("PRAGMA quick_check(3)")]
            if check != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(r.replace("\n", " ") for r in check))
            set_wal(self.db)
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            sqlitedb.migrate(self.db, path, MIGRATIONS, "migrations")
        except sqlitedb.SchemaError as exc:
            raise RagError(f"document catalogue {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise RagError(f"document catalogue {path}: {exc}") from None

    # --- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None
        self._collections.clear()
        self._chroma = None
        lock.release(getattr(self, "_lock_fh", None))
        self._lock_fh = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- chroma -----------------------------------------------------------------------------------

    @property
    def chroma(self):
        if self._chroma is None:
            self._chroma = chroma_client.connect(self.root / "chroma", self.chroma_url)
        return self._chroma

    @_locked
    def _vectors(self, name: str):
        col = self._collections.get(name)
        if col is None:
            # embedding_function=None: vectors always come from crofter's embedder, so Chroma
            # never loads (or downloads) a model of its own.
            meta = {"hnsw:space": "cosine"}
            if self.hnsw_sync_threshold:
                meta.update({"hnsw:sync_threshold": self.hnsw_sync_threshold,
                             "hnsw:batch_size": min(100, self.hnsw_sync_threshold)})
            col = self.chroma.get_or_create_collection(CHROMA_PREFIX + name, embedding_function=None, metadata=meta)
            self._collections[name] = col
        return col

    @_locked
    def reset_vectors(self, name: str) -> None:
        """Drop a collection's Chroma side (even with damaged index files) and start it empty."""
        try:
            self.chroma.delete_collection(CHROMA_PREFIX + name)
        except Exception:  # not there (already dropped, or a fresh Chroma folder)
            pass
        self._collections.pop(name, None)
        self._vectors(name)

    @_locked
    def add_vectors(self, name: str, ids: list[str], embeddings, paths: list[str]) -> None:
        if ids:
            self._vectors(name).add(ids=ids, embeddings=embeddings, metadatas=[{"path": p} for p in paths])

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
            f"{_FILE_ROW} WHERE collection = ? AND path = ?",
            (collection, path)).fetchone()
        return FileRecord(*row) if row else None

    @_locked
    def files(self, collection: str) -> list[FileRecord]:
        return [FileRecord(*r) for r in self.db.execute(
            f"{_FILE_ROW} WHERE collection = ? ORDER BY path",
            (collection,))]

    @_locked
    def copies(self, collection: str, sha256: str, path: str, limit: int = 1000) -> list[FileRecord]:
        """Stored files other than `path` with these bytes and chunks of their own (index files_by_sha)."""
        return [FileRecord(*r) for r in self.db.execute(
            f"{_FILE_ROW} WHERE collection = ? AND sha256 = ? AND path <> ? AND status = 'ok' AND n_chunks > 0 "
            "ORDER BY path LIMIT ?", (collection, sha256, path, limit))]

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
                rows.append((cid, collection, rec.path, ch.index, ch.page, ch.heading, ch.start, ch.end, ch.text,
                             ch.title, ch.context))
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
                'INSERT INTO chunks (id, collection, path, idx, page, heading, start, "end", text, title, context) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
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
                    f'SELECT id, path, idx, page, heading, start, "end", text, title, context FROM chunks '
                    f"WHERE collection = ? AND id IN ({marks})", (collection, *part)):
                out[r[0]] = StoredChunk(*r)
        return out

    @_locked
    def dense(self, collection: str, vector, n: int) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first, from HNSW (approximate)."""
        col = self._vectors(collection)
        if (count := col.count()) == 0:
            return []
        res = col.query(query_embeddings=[list(map(float, vector))], n_results=min(n, count), include=["distances"])
        return [(cid, 1.0 - float(d)) for cid, d in zip(res["ids"][0], res["distances"][0])]

    @_locked
    def vectors(self, collection: str, ids: list[str]) -> list[tuple[str, list[float]]]:
        """(chunk id, stored vector) for those of `ids` that Chroma holds."""
        got = self._vectors(collection).get(ids=list(ids), include=["embeddings"]) if ids else {"ids": []}
        return list(zip(got["ids"], got["embeddings"])) if len(got["ids"]) else []

    @_locked
    def keyword(self, collection: str, query: str, n: int, weights=(1.0, 1.0, 1.0)) -> list[tuple[str, float]]:
        """(chunk id, BM25 score with column `weights` text/heading/title, higher is better)."""
        terms = re.findall(r"\w+", query, flags=re.UNICODE)
        if not terms:
            return []
        # Every term quoted: user text is data, never FTS5 syntax (NEAR, AND, column filters...).
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in dict.fromkeys(terms))
        rows = self.db.execute(
            "SELECT c.id, bm25(chunks_fts, ?, ?, ?) AS s FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
            "WHERE chunks_fts MATCH ? AND c.collection = ? ORDER BY s LIMIT ?",
            (*map(float, weights), match, collection, n)).fetchall()
        return [(cid, -float(s)) for cid, s in rows]

    @_locked
    def vector_ids(self, collection: str) -> list[str]:
        """Every id Chroma holds for the collection (consistency checks)."""
        col = self._vectors(collection)
        return [i for off in range(0, col.count(), 1000) for i in col.get(limit=1000, offset=off, include=[])["ids"]]

    @_locked
    def chunk_ids(self, collection: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE collection = ?", (collection,))]

"""Ingest files and folders into a collection: hash, extract, chunk, embed, store.

Unchanged files (same SHA-256 as the catalogue) are skipped without loading the
embedder; changed files replace their chunks (a window whose text did not change keeps its
vector instead of being embedded again, and so does a copy of a file the collection already
holds under another path); files that disappeared from an ingested
folder lose theirs (unless the folder is gone or has no file left: it may only be unmounted, so
its files stay until `crofter collections forget`); unreadable files are recorded as ``failed: <reason>`` and the batch
goes on. Chunks of several files are embedded together in batches (the embedder is
the expensive part), and a group of files is committed as soon as its vectors exist.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .chunking import DEFAULT_CONTEXT, DEFAULT_OVERLAP, DEFAULT_SIZE, Chunk, Chunker, title_of
from .embed import release_heap
from .loaders import MAX_FILE_BYTES, LoadError, extract, supported
from .store import FileRecord, RagError, Store, chunk_id

# Files are committed in groups once this many chunks are waiting (one encode call).
GROUP_CHUNKS = 256
RUN_CACHE = 20_000  # vectors one run keeps for texts that come again (Ingestor._vectors_for)
TWINS = 3  # stored copies of a file asked for its vectors (Ingestor._borrow)


@dataclass
class Progress:
    files_total: int = 0
    files_done: int = 0
    chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    current: str = ""

    @property
    def chunks_per_s(self) -> float:
        dt = time.monotonic() - self.started
        return self.chunks / dt if dt > 0 else 0.0


@dataclass
class Summary:
    collection: str
    ingested: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0
    backend: str = ""  # what ran the embedder (rag/embed.py: torch, torch-bf16, ...); "" when none was loaded
    fallback: str = ""  # why "auto" ran torch instead of openvino (rag/embed.py `Embedder.fallback`); "" if it did not

    def as_dict(self) -> dict:
        return {
            "collection": self.collection,
            "ingested": self.ingested,
            "unchanged": self.unchanged,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "removed": self.removed,
            "chunks": self.chunks,
            "seconds": round(self.seconds, 3),
            "backend": self.backend,
            "fallback": self.fallback,
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def walk(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """(files to consider, folders walked, named paths that do not exist).

    Folders are walked without following symlinked folders; hidden entries (``.git``)
    and unsupported suffixes are skipped. A file named explicitly is always tried."""
    files: list[Path] = []
    roots: list[Path] = []
    missing: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw).expanduser().absolute()
        if p.is_dir():
            roots.append(p)
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if supported(f):
                        files.append(f)
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            missing.append((str(p), "no such file or folder"))
    return list(dict.fromkeys(files)), roots, missing


class Ingestor:
    """>>> Ingestor(store, embedder_factory).run(["docs/"], "docs")   # doctest: +SKIP"""

    def __init__(self, store: Store, embedder_factory: Callable[[], object], *, embedder_name: str,
                 chunk_size: int = DEFAULT_SIZE, chunk_overlap: int = DEFAULT_OVERLAP, max_bytes: int = MAX_FILE_BYTES,
                 context: str = DEFAULT_CONTEXT):
        self.store = store
        self._factory = embedder_factory
        self._embedder = None
        self.embedder_name = embedder_name
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.max_bytes = max_bytes
        self.context = context
        self._chunker = None
        self._recent: dict[bytes, object] = {}  # this run's vectors by text digest (_vectors_for)
        self._lent: dict[bytes, object] = {}  # stored vectors the pending group's windows borrow (_borrow)

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = self._factory()
        return self._embedder

    def _ensure_collection(self, name: str):
        info = self.store.collection(name)
        if info is None:
            emb = self.embedder
            return self.store.create_collection(name, self.embedder_name, emb.dimension, self.chunk_size,
                                                self.chunk_overlap)
        if info.embedder != self.embedder_name:
            raise RagError(f"collection {name!r} was built with embedder {info.embedder}; "
                           f"use the same one or a new collection (got {self.embedder_name})")
        # The collection's own chunking settings win, so a re-ingest stays comparable.
        self.chunk_size, self.chunk_overlap = info.chunk_size, info.chunk_overlap
        return info

    def run(self, paths: Iterable[str | os.PathLike], collection: str,
            on_progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Summary:
        self._recent, self._lent = {}, {}
        try:
            return self._run(paths, collection, on_progress, should_stop)
        finally:
            self._recent, self._lent = {}, {}  # up to RUN_CACHE vectors, not kept past the run

    def _run(self, paths, collection: str, on_progress, should_stop) -> Summary:
        t0 = time.monotonic()
        files, roots, missing = walk(paths)
        summary = Summary(collection)
        summary.failed.extend(missing)
        info = self.store.collection(collection)
        if info is not None:
            self._ensure_collection(collection)
        prog = Progress(files_total=len(files))
        pending: list[tuple[FileRecord, list]] = []
        pending_chunks = 0

        def tick() -> None:
            if on_progress:
                on_progress(prog)

        tick()
        for f in files:
            if should_stop and should_stop():
                break
            key = str(f)
            prog.current = key
            old = self.store.file(collection, key) if info is not None else None
            try:
                st = f.stat()
                # Same size and nanosecond mtime as last time: unchanged without reading it
                # (what rsync and make trust); otherwise the content hash decides.
                if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    digest = old.sha256
                elif f.is_file() and st.st_size <= self.max_bytes:
                    digest = sha256_file(f)
                else:
                    digest = ""  # not hashed: extract() refuses it below (FIFO, device, over the cap)
            except OSError as exc:
                summary.failed.append((key, f"cannot read: {exc.strerror or exc}"))
                prog.files_done += 1
                tick()
                continue
            if old is not None and old.sha256 == digest and digest:
                if old.status == "failed":
                    summary.failed.append((key, old.reason or "failed"))
                else:
                    summary.unchanged.append(key)
                if old.mtime_ns != st.st_mtime_ns:
                    self.store.touch_file(collection, key, st.st_mtime_ns)
                prog.files_done += 1
                tick()
                continue
            if info is None:
                info = self._ensure_collection(collection)
            try:
                doc = extract(f, self.max_bytes)
                chunks = self.chunker.split(doc, title_of(f))
                if not chunks:
                    raise LoadError("no text in the file")
            except (LoadError, RecursionError, MemoryError, ValueError, LookupError) as exc:
                # A parser's own bug on a hostile file is this file's failure, not the batch's.
                reason = str(exc) if isinstance(exc, LoadError) else f"cannot parse ({type(exc).__name__}: {str(exc)[:120]})"
                rec = FileRecord(key, digest, st.st_size, st.st_mtime_ns, "failed", reason, 0)
                pending.append((rec, []))
                summary.failed.append((key, reason))
                prog.files_done += 1
                tick()
                continue
            self._borrow(collection, old, digest, key, chunks)
            rec = FileRecord(key, digest, st.st_size, st.st_mtime_ns, "ok", None, len(chunks))
            pending.append((rec, chunks))
            pending_chunks += len(chunks)
            if pending_chunks >= GROUP_CHUNKS:
                self._flush(collection, pending, summary, prog)
                pending, pending_chunks = [], 0
            prog.files_done += 1
            tick()
        self._flush(collection, pending, summary, prog)
        # A named folder that is gone, or has nothing left in it, may only be unmounted (a USB disk,
        # a network share that dropped out under --watch, leaving an empty mount point): its
        # files stay until the user says otherwise (`crofter collections forget`).
        keep = f"stay in the collection (`crofter collections forget {collection} PATH` drops them)"
        if roots and info is not None and not (should_stop and should_stop()):
            seen = {str(f) for f in files}
            walked = {str(r) for r in roots if any(f.startswith(str(r) + os.sep) for f in seen)}
            gone, kept = [], {}
            for rec in self.store.files(collection):
                root = next((r for r in roots if _under(rec.path, r)), None)
                if root is None or rec.path in seen or Path(rec.path).exists():
                    continue
                if str(root) in walked:
                    gone.append(rec.path)
                else:
                    kept[str(root)] = kept.get(str(root), 0) + 1
            self.store.remove_files(collection, gone)
            summary.removed.extend(gone)
            summary.failed.extend((root, f"no files left in the folder; the {n} file(s) stored from it {keep}")
                                  for root, n in kept.items())
        if missing and info is not None:
            for i, (path, reason) in enumerate(summary.failed):
                held = len(stored_under(self.store, collection, path)) if (path, reason) in missing else 0
                if held:
                    summary.failed[i] = (path, f"{reason}; the {held} file(s) stored from it {keep}")
        tick()
        summary.seconds = time.monotonic() - t0
        summary.backend = getattr(self._embedder, "backend", "") or ""
        summary.fallback = getattr(self._embedder, "fallback", "") or ""
        return summary

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            self._chunker = Chunker(self.embedder.tokenizer, self.chunk_size, self.chunk_overlap, self.context)
        return self._chunker

    def _flush(self, collection: str, pending: list[tuple[FileRecord, list]], summary: Summary, prog: Progress) -> None:
        if not pending:
            return
        texts = [c.embedding_text() for _, chunks in pending for c in chunks]
        vectors = self._vectors_for(texts) if texts else []
        batch = []
        i = 0
        for rec, chunks in pending:
            batch.append((rec, chunks, vectors[i:i + len(chunks)] if chunks else None))
            i += len(chunks)
        self.store.write_files(collection, batch)
        self._lent = {}
        release_heap()
        for rec, chunks in pending:
            if rec.status == "ok":
                summary.ingested.append(rec.path)
                summary.chunks += len(chunks)
        prog.chunks += len(texts)

    def _vectors_for(self, texts: list[str]):
        """Each distinct text is embedded once per run: a passage repeated across files (a folder
        and its copy, GPL and GPL-3) costs one encode, and its copies get the very same vector.
        Up to RUN_CACHE vectors are kept for the groups that follow (1.5 KB each at 384 dims)."""
        import numpy as np

        keys = [_digest(t) for t in texts]
        text_of = dict(zip(keys, texts))
        todo = [k for k in dict.fromkeys(keys) if k not in self._recent and k not in self._lent]
        fresh = {}
        if todo:
            encoded = np.asarray(self.embedder.encode([text_of[k] for k in todo]), dtype=np.float32)
            if encoded.ndim != 2 or len(encoded) != len(todo):
                raise RagError(f"the embedder returned {len(encoded)} vectors for {len(todo)} texts")
            fresh = dict(zip(todo, encoded))
            for k in todo[:max(0, RUN_CACHE - len(self._recent))]:
                self._recent[k] = fresh[k]
        return np.stack([fresh[k] if k in fresh else self._recent[k] if k in self._recent else self._lent[k]
                         for k in keys])

    def _borrow(self, collection: str, old: FileRecord | None, digest: str, path: str, chunks: list) -> None:
        """Stored vectors a file's windows can take instead of being embedded: a changed file's
        previous version lends the windows an edit did not touch, and a stored copy of the file
        under another path (the same bytes: a second folder ingested on another day) lends every
        window with the same text and context. Copies with the same title (the file name, part of
        each window's context) are asked first, at most TWINS of them, until every window is
        covered. Only the vectors this file needs are read into memory, and only until its group
        is written. Best effort: a store that cannot be read lends nothing."""
        need = {k for k in map(_digest, (c.embedding_text() for c in chunks))
                if k not in self._recent and k not in self._lent}
        if need and old is not None:
            need -= self._remember(collection, old, need)
        if not need or not digest:
            return
        try:
            copies = self.store.copies(collection, digest, path)
        except Exception:  # noqa: BLE001 - the windows are embedded instead
            return
        title = title_of(path)
        copies.sort(key=lambda r: title_of(r.path) != title)  # stable: by path within each
        for rec in copies[:TWINS]:
            need -= self._remember(collection, rec, need)
            if not need:
                break

    def _remember(self, collection: str, src: FileRecord, need: set[bytes]) -> set[bytes]:
        """Lend `src`'s stored vectors to the windows in `need` (digests of embedding texts); returns
        the digests it found. A vector is lent only to the very text it was made from; one made by
        another backend of the same model (int8, bf16) is lent as it is, and `crofter collections
        rebuild` re-embeds everything. A stored vector that is not unit length (a damaged store)
        is not lent."""
        import numpy as np

        found: set[bytes] = set()
        if src.status != "ok" or not src.n_chunks:
            return found
        ids = [chunk_id(src.path, src.sha256, i) for i in range(src.n_chunks)]
        try:
            for i in range(0, len(ids), 1000):
                rows = self.store.chunks(collection, ids[i:i + 1000])
                wanted, taken = {}, set()
                for cid, r in rows.items():
                    key = _digest(Chunk(r.idx, r.start, r.end, r.text, r.heading, r.page, r.context).embedding_text())
                    if key in need and key not in found and key not in taken:
                        wanted[cid] = key
                        taken.add(key)
                for cid, vec in self.store.vectors(collection, list(wanted)) if wanted else ():
                    v = np.asarray(vec, dtype=np.float32)
                    if v.ndim == 1 and np.all(np.isfinite(v)) and abs(float(np.linalg.norm(v)) - 1.0) < 1e-3:
                        self._lent[wanted[cid]] = v
                        found.add(wanted[cid])
        except Exception:  # noqa: BLE001 - the windows are embedded instead, as before this shortcut
            pass
        return found


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()


def stored_under(store: Store, collection: str, path: str | os.PathLike) -> list[str]:
    """The paths of the collection's files at or under `path` (made absolute like `walk` does)."""
    root = Path(path).expanduser().absolute()
    return [r.path for r in store.files(collection) if _under(r.path, root)]


def _under(path: str, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False

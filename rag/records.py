"""What the document catalogue holds, as plain records: collections, files, chunks, and the
names and ids they go by. rag.store reads and writes them (and re-exports them)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import RagError

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


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
    title: str = ""
    context: str | None = None  # what it was embedded with besides its text; None: its heading


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

"""What makes a stage's output still good: a key over its settings, its input files and the
key of the stage before it. Same key, same output: the stage is skipped. A changed stage gets a
new key, and so does every stage after it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONTENT_LIMIT = 64 << 20  # files up to this size are hashed by content; larger ones by size and mtime


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (size:mtime for very large files); for a folder, of every file in it."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_digest(f).encode() + b"\n")
        return h.hexdigest()
    st = path.stat()
    if st.st_size > CONTENT_LIMIT:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(value):
    if isinstance(value, Path):
        return {"file": value.name, "sha256": file_digest(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def key(*parts) -> str:
    """A short stable hash of `parts` (paths stand for their content)."""
    text = json.dumps(_plain(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_key(folder: Path) -> str:
    """A base model's key: its files' names, sizes and mtimes (hashing gigabytes on every run would be slow)."""
    folder = Path(folder)
    items = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        items.append(f"{f.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns}")
    return key(str(folder.resolve()), items)


def tool_version() -> str:
    """Stages re-run when crofter itself changes version (its commands may write other outputs)."""
    from app import __version__

    return __version__

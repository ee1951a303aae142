"""Outputs that appear at their final path only when complete.

Every writer of a model, checkpoint, registry or config file goes through here:
write to a temporary name in the *same* folder (so the final rename is atomic on
POSIX), fsync, then `os.replace`. A crash or kill -9 leaves at most a
``.NAME.*.partial`` file that the next run may delete, never a half-written file
at the final path.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(folder: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    """A fresh, unique temporary path next to `final` (created empty)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    return Path(name)


def commit(temp: Path, final: Path) -> None:
    """fsync `temp` and move it to `final` atomically."""
    with open(temp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it becomes `final`, on error it is removed.

    >>> with atomic_path("out.gguf") as tmp:        # doctest: +SKIP
    ...     write_model(tmp)
    """
    final = Path(final)
    sweep_stale(final)
    temp = temp_path_for(final)
    # The writer holds an flock on its temp file while it works: a later run can tell a
    # partial left by a killed process (unlocked) from one still being written.
    holder = open(temp, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        yield temp
        commit(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    finally:
        holder.close()


def sweep_stale(final: Path) -> list[Path]:
    """Delete ``.NAME.*.partial`` files next to `final` that no live writer holds."""
    removed = []
    for p in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        try:
            with open(p, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                p.unlink()
                removed.append(p)
        except (BlockingIOError, FileNotFoundError):
            continue  # someone is writing it, or it is already gone
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder under `parent` for work in progress, flock-held while in use and
    removed after; folders that killed runs left there (no live holder) are swept first."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_dirs(parent)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when no other run is using it


def sweep_stale_dirs(parent: Path) -> list[Path]:
    """Delete folders under `parent` that no live `staging_dir` holds."""
    removed = []
    for p in parent.iterdir() if parent.is_dir() else []:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        except BlockingIOError:
            continue  # a live pull is using it
        finally:
            os.close(fd)
    return removed


def write_text(final: str | os.PathLike, text: str) -> None:
    """Atomically replace a small text file (registry, config)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")

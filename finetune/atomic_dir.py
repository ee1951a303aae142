"""Folders that appear at their final path only when complete (merged checkpoints, final adapters).

The folder is written as ``.NAME.<random>.partial`` next to its final path, then renamed into
place. The writer holds an flock on the temp folder itself while it works, so the next writer in
that folder can tell a temp left by a killed process (unlocked: deleted) from one being written
(locked: left alone). The same scheme as models/atomic.py uses for single files.

    >>> with atomic_dir(Path("out/merged")) as tmp:      # doctest: +SKIP
    ...     model.save_pretrained(tmp)
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


def sweep_stale_dirs(final: Path) -> list[Path]:
    """Delete ``.NAME.*.partial`` folders next to `final` that no live writer holds."""
    removed = []
    for p in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes `final`, on any error it is removed.

    replace=False refuses (FileExistsError) when `final` appears meanwhile; replace=True swaps an
    existing `final` out (the old one is kept until the new one is in place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_dirs(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
            os.replace(final, old / "old")  # old is unlocked, so a crash here leaves it to the next sweep
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)

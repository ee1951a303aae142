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
    """A fresh folder under `parent` for work in progress (a download), flock-held while in
    use and removed after; folders that killed runs left there are swept first."""
    parent.mkdir(parents=True, exist_ok=True)
    _remove_unheld_dirs(parent.iterdir())
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = _hold(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when no other run is using it


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes `final`, on any error it is removed.

    The folder is written as ``.NAME.<random>.partial`` next to `final` and renamed into place,
    flock-held meanwhile like `atomic_path`'s files. replace=False refuses (FileExistsError)
    when `final` appears meanwhile; replace=True swaps an existing `final` out (the old one is
    kept until the new one is in place).

    >>> with atomic_dir(Path("out/merged")) as tmp:      # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partial_dirs(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    fd = _hold(tmp)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
            os.replace(final, old / "old")  # old is unlocked, so a crash here leaves it to the next sweep
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def sweep_stale_partial_dirs(final: Path) -> list[Path]:
    """Delete ``.NAME.*.partial`` folders next to `final` that no live `atomic_dir` holds."""
    return _remove_unheld_dirs(final.parent.glob(f".{glob.escape(final.name)}.*.partial"))


def _hold(folder: Path) -> int:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_unheld_dirs(candidates) -> list[Path]:
    """Delete the folders among `candidates` whose flock nobody holds (their writer was killed)."""
    removed = []
    for p in candidates:
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


def write_text(final: str | os.PathLike, text: str) -> None:
    """Atomically replace a small text file (registry, config)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")

"""One process owns the document store at a time: an flock on ``<store>/lock`` with the owner's pid."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StoreLocked(Exception):
    pass


def acquire(root: Path):
    """An open file holding the lock, or StoreLocked naming the process that has it."""
    path = root / "lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise StoreLocked(f"the document store {root} is in use by another crofter process (pid {pid}); "
                          "close it and try again") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def release(fh) -> None:
    if fh is not None:
        try:
            fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()

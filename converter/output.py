"""Writing a converter output: atomically (models.atomic), with a failed write as one clear line.

A full disk (ENOSPC), a file-size limit (EFBIG, `ulimit -f`), a quota or a read-only
filesystem surfaces as a ConvertError naming the file and the cause; the temp file is
removed on the way out, so nothing is left at the final path and nothing half-written
beside it.

    >>> with output_file("smol-F16.gguf") as tmp:        # doctest: +SKIP
    ...     write_model(tmp)
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Iterator
from pathlib import Path

from .hf import ConvertError

_CAUSES = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was reached (ulimit -f)",
           errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the filesystem is read-only"}


def write_error(final: Path, cause: str) -> ConvertError:
    return ConvertError(f"writing {final} failed: {cause}")


@contextlib.contextmanager
def output_file(final: str | os.PathLike) -> Iterator[Path]:
    """models.atomic.atomic_path, with out-of-space and read-only failures as ConvertError."""
    from models.atomic import atomic_path

    final = Path(final)
    try:
        with atomic_path(final) as tmp:
            try:
                yield tmp
            except OSError as exc:
                # numpy's tofile reports a short write with no errno ("N requested and M written"):
                # ask the filesystem and the limits what happened.
                cause = _CAUSES.get(exc.errno) or (space_cause(tmp, 0) if exc.errno is None else None)
                if cause is None:
                    raise
                raise write_error(final, cause) from exc
    except OSError as exc:  # the final fsync and rename
        if exc.errno not in _CAUSES:
            raise
        raise write_error(final, _CAUSES[exc.errno]) from exc


def space_cause(partial: Path, needed: int) -> str | None:
    """Why a native writer (llama.cpp) may have failed on `partial`: a full disk or a hit
    file-size limit, read from the filesystem and the process limits; None when neither."""
    try:
        size = partial.stat().st_size
        st = os.statvfs(partial.parent)
    except OSError:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size >= soft - (1 << 20):
        return _CAUSES[errno.EFBIG]
    if st.f_bavail * st.f_frsize < max(needed - size, 1 << 20):
        return _CAUSES[errno.ENOSPC]
    return None

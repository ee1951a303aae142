"""File access confined to the roots the user configured (`tool_roots`).

A path is resolved (symlinks followed) and must then lie inside a resolved
root; only regular files and folders are served, never devices, FIFOs or sockets,
and files over a size cap are refused. No root configured means no file access.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

MAX_READ_BYTES = 256 * 1024
MAX_LIST_ENTRIES = 500


class FileAccessError(PermissionError):
    """A path outside the roots, of a refused kind, or too large."""


def confine(roots: list[str], path: str) -> Path:
    """The real path of `path` (relative paths are taken from the first root) if it is inside a root."""
    if not roots:
        raise FileAccessError("file access is off: no tool_roots configured (crofter config set tool_roots DIR)")
    if "\x00" in path:  # os calls would raise ValueError ("embedded null byte") rather than refuse
        raise FileAccessError(f"{path!r}: a NUL character in the path")
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = real_roots[0] / candidate
    real = Path(os.path.realpath(candidate))
    if not any(real == r or r in real.parents for r in real_roots):
        raise FileAccessError(f"{path}: outside the allowed folders")
    return real


def read_text(roots: list[str], path: str) -> str:
    real = confine(roots, path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise FileAccessError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileAccessError(f"{path}: not a regular file")
    if st.st_size > MAX_READ_BYTES:
        raise FileAccessError(f"{path}: {st.st_size} bytes is over the {MAX_READ_BYTES}-byte limit")
    # O_NOFOLLOW|O_NONBLOCK: the file cannot be swapped for a link or a FIFO between check and open.
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise FileAccessError(f"{path}: not a regular file")
        data = fh.read(MAX_READ_BYTES + 1)
    return data[:MAX_READ_BYTES].decode("utf-8", errors="replace")


def list_entries(roots: list[str], path: str) -> list[str]:
    real = confine(roots, path)
    if not real.is_dir():
        raise FileAccessError(f"{path}: not a folder")
    out = []
    for entry in sorted(os.scandir(real), key=lambda e: e.name)[:MAX_LIST_ENTRIES]:
        kind = "dir" if entry.is_dir(follow_symlinks=False) else "file" if entry.is_file(follow_symlinks=False) else "other"
        out.append(f"{entry.name}/" if kind == "dir" else entry.name if kind == "file" else f"{entry.name} ({kind})")
    return out


MAX_CHOICES = 200  # names a turn's grammar may offer for one path argument
_SCAN_ENTRIES = 5000  # directory entries looked at before the listing gives up


def names(roots: list[str], folders: bool = False, cap: int = MAX_CHOICES) -> list[str] | None:
    """The regular files (or, `folders`, the folders, "." first) under the roots, shallowest
    first, as paths `confine` accepts: relative for the first root, absolute for the others.

    For a path argument's grammar (tools.schema.Tool.choices), so a model can only name what
    exists. Left out: hidden names (a leading "."), links that lead outside the roots, names a
    grammar literal cannot carry (quotes, backslashes, control characters). None when there
    are more than `cap` (or more than `_SCAN_ENTRIES` entries to look at): the argument then
    stays a free string."""
    out: list[str] = ["."] if folders and roots else []
    seen = 0
    for i, root in enumerate(roots):
        base = Path(root).expanduser().resolve()
        queue = [base]
        while queue:
            folder = queue.pop(0)
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                seen += 1
                if seen > _SCAN_ENTRIES:
                    return None
                if entry.name.startswith(".") or any(c in entry.name for c in '"\\') or not entry.name.isprintable():
                    continue
                shown = os.path.relpath(entry.path, base) if i == 0 else entry.path
                try:
                    real = confine(roots, shown)
                    st = os.stat(real)
                except (OSError, FileAccessError):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if entry.is_dir(follow_symlinks=False):  # a linked folder is named, not walked
                        queue.append(Path(entry.path))
                    if folders:
                        out.append(shown)
                elif stat.S_ISREG(st.st_mode) and not folders:
                    out.append(shown)
                if len(out) > cap:
                    return None
    return out


def named_in(message: str, path: str) -> bool:
    """Whether `message` names the file `path` (its last part, any case, as a word of its own:
    "Read notes.txt." names notes.txt, "my_notes.txt" and "notes.txt.bak" do not)."""
    name = os.path.basename(path.rstrip("/"))
    if not name or name == ".":
        return False
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", message, re.I) is not None


# The words of a plain request for a file's text or a folder's listing, and of asking for
# something more (then the result is a step, not the answer). English only: in another language
# the shortcut stays off and the model answers in its own words, as before.
READ_WORDS = ("read", "open", "show", "print", "display", "view", "cat", "contents", "content", "contain",
              "contains", "what is in", "what's in")
LIST_WORDS = ("list", "listing", "files", "folder", "folders", "directory", "documents", "ls")
OTHER_WORDS = ("summarise", "summarize", "summary", "translate", "count", "how many", "compare", "explain",
               "calculate", "compute", "add", "sum", "total", "which of", "mention", "mentions", "find", "search",
               "then")


def asks_for(message: str, words) -> bool:
    """Whether `message` has one of `words` (or phrases) as words of their own, in any case."""
    low = message.lower()
    return any(re.search(rf"(?<![\w'-]){re.escape(w)}(?![\w'-])", low) for w in words)

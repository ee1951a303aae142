"""The user's text for `eval --text` and `tune pretrain --text`: files and folders read by rag's
loaders (txt, md, rst, html, pdf, docx, code), as `crofter ingest` reads them."""
from __future__ import annotations

from pathlib import Path

from ..errors import CLIError


def read_documents(paths, flag: str = "--text") -> list[tuple[str, str]]:
    """(name, text) of each file, or of every readable file under each folder, sorted; a
    missing path, a folder with nothing readable or a file its loader refuses is a one-line
    error naming it."""
    from rag.ingest import walk
    from rag.loaders import LoadError, extract

    docs = []
    for path in paths:
        p = Path(path).expanduser()
        if p.is_dir():
            files = sorted(walk([p])[0])  # as ingest walks: hidden folders (.git) and symlinked ones left out
            if not files:
                raise CLIError(f"{flag} {path}: no readable files in the folder")
        elif p.is_file():
            files = [p]
        else:
            raise CLIError(f"{flag} {path}: no such file or folder")
        for f in files:
            try:
                docs.append((str(f), extract(f).text))
            except LoadError as e:
                raise CLIError(f"{flag} {f}: {e}") from None
    return docs

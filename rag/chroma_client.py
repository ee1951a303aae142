"""Opening Chroma: the embedded PersistentClient under the store, or a server by URL; no telemetry."""
from __future__ import annotations

from pathlib import Path

from .errors import RagError


def settings():
    from chromadb.config import Settings

    # No telemetry: crofter makes no network calls at run time.
    return Settings(anonymized_telemetry=False, allow_reset=False)


def connect(folder: Path, url: str | None = None):
    """A Chroma client: embedded in `folder`, or the server at `url` (http://HOST:PORT), checked alive."""
    import chromadb

    if not url:
        return chromadb.PersistentClient(path=str(folder), settings=settings())
    from urllib.parse import urlparse

    u = urlparse(url if "://" in url else f"http://{url}")
    if not u.hostname:
        raise RagError(f"--chroma-url {url}: expected http://HOST:PORT")
    try:
        client = chromadb.HttpClient(host=u.hostname, port=u.port or 8000, ssl=u.scheme == "https", settings=settings())
        client.heartbeat()
    except Exception as exc:
        raise RagError(f"cannot reach the Chroma server at {url}: {exc}") from None
    return client

"""rag fixtures: the bundled embedder loaded once, a store in the test's temp dir, a copy of real documents."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture(scope="session")
def embedder():
    from rag.embed import Embedder

    return Embedder(device="cpu")


@pytest.fixture
def store(tmp_path):
    from rag.store import Store

    s = Store(tmp_path / "rag")
    yield s
    s.close()


@pytest.fixture
def ingestor(store, embedder):
    from rag.ingest import Ingestor

    return Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2")


@pytest.fixture
def licenses(tmp_path) -> Path:
    """A writable copy of a few real license texts from the machine (small ones, to stay quick)."""
    assert LICENSES.is_dir(), "/usr/share/common-licenses is part of the Debian base system"
    dst = tmp_path / "licenses"
    dst.mkdir()
    for name in ("Apache-2.0", "BSD", "MPL-2.0", "CC0-1.0"):
        shutil.copy(LICENSES / name, dst / name)
    return dst


def consistent(store, collection: str) -> None:
    """Catalogue and vector store hold exactly the same chunk ids, with no duplicates."""
    ids = store.chunk_ids(collection)
    vec = store.vector_ids(collection)
    assert len(ids) == len(set(ids)), "duplicate chunks in the catalogue"
    assert len(vec) == len(set(vec)), "duplicate vectors"
    assert set(ids) == set(vec)

"""Chunk context (what a chunk is embedded with), the title as a search field, the catalogue
migration that adds both (#17 item 2); the embedding backends are in test_embed_backends.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from rag.chunking import CONTEXTS, Chunker, title_of
from rag.loaders import extract
from rag.retrieve import Retriever
from rag.store import Store

from .conftest import LICENSES

DOC = """# Tide tables

How the harbour tides are read.

## Spring tides

The range is widest a day or two after the full moon. Boats leave on the ebb. """ + "More words here. " * 40


def test_each_context_changes_what_is_embedded_never_what_is_shown(tmp_path, embedder):
    f = tmp_path / "harbour_notes.md"
    f.write_text(DOC)
    doc = extract(f)
    assert title_of(f) == "harbour notes"
    seen = {}
    for ctx in CONTEXTS:
        chunks = Chunker(embedder.tokenizer, size=32, overlap=4, context=ctx).split(doc, title_of(f))
        for c in chunks:
            assert c.text == doc.text[c.start:c.end] and c.title == "harbour notes"
            assert c.embedding_text().endswith(c.text)
        spring = [c for c in chunks if c.heading.endswith("Spring tides")]
        seen[ctx] = [c.embedding_text()[: -len(c.text)] for c in spring]
    assert seen["none"][0] == ""
    assert seen["heading"][0] == "Tide tables > Spring tides\n"
    assert seen["title"][0] == "harbour notes\n"
    assert seen["title+heading"][0] == "harbour notes > Tide tables > Spring tides\n"
    # A later window of the section is read with the sentence that came just before it.
    later = seen["title+heading+previous"][1]
    assert later.startswith("harbour notes > Tide tables > Spring tides\n") and len(later.split("\n")) == 3
    with pytest.raises(ValueError, match="chunk context must be one of"):
        Chunker(embedder.tokenizer, context="everything")


def test_the_title_is_a_keyword_field(tmp_path, store, embedder):
    from rag.ingest import Ingestor

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sourdough_starter.md").write_text("Feed it flour and water every twelve hours; keep it warm.\n")
    shutil.copy(LICENSES / "BSD", docs / "BSD")
    Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([docs], "c")
    # "sourdough" is only in the file's name: found by keyword through the title column,
    # which scores it (weight 1) and stops scoring it at weight 0.
    hits = Retriever(store, embedder).search("c", "sourdough", k=1, mode="keyword")
    assert hits and hits[0].source.endswith("sourdough_starter.md")
    assert store.keyword("c", "sourdough", 5, (1.0, 1.0, 1.0))[0][1] > 0
    assert store.keyword("c", "sourdough", 5, (1.0, 1.0, 0.0))[0][1] == 0
    (row,) = [c for c in store.chunks("c", store.chunk_ids("c")).values() if c.path.endswith("sourdough_starter.md")]
    assert row.title == "sourdough starter" and row.context is not None


def test_a_catalogue_from_before_titles_migrates_and_keeps_its_vectors_reproducible(tmp_path, embedder, monkeypatch):
    """A catalogue of the 0001 schema (the crofter before titles, written here row by row as it
    wrote them): after 0002 its rows keep their keyword index, have no title, and re-embedding
    from the catalogue gives back the vectors they were ingested with (their heading context)."""
    import rag.store
    from rag import verify
    from rag.store import chunk_id

    f = tmp_path / "notes.md"
    f.write_text(DOC)
    chunks = Chunker(embedder.tokenizer, size=32, overlap=4).split(extract(f))
    ids = [chunk_id(str(f), "0" * 64, c.index) for c in chunks]
    vectors = embedder.encode([f"{c.heading}\n{c.text}" if c.heading else c.text for c in chunks])
    real = rag.store.MIGRATIONS
    monkeypatch.setattr(rag.store, "MIGRATIONS", real[:1])
    with Store(tmp_path / "rag") as s:
        s.create_collection("c", "all-MiniLM-L6-v2", embedder.dimension, 32, 4)
        s.db.execute("INSERT INTO files VALUES ('c', ?, ?, 1, 1, 'ok', NULL, ?, 0)", (str(f), "0" * 64, len(chunks)))
        s.db.executemany('INSERT INTO chunks (id, collection, path, idx, page, heading, start, "end", text) '
                         "VALUES (?, 'c', ?, ?, ?, ?, ?, ?, ?)",
                         [(i, str(f), c.index, c.page, c.heading, c.start, c.end, c.text) for i, c in zip(ids, chunks)])
        s.add_vectors("c", ids, vectors, [str(f)] * len(ids))
    monkeypatch.setattr(rag.store, "MIGRATIONS", real)
    with Store(tmp_path / "rag") as s:
        assert [r[0] for r in s.db.execute("SELECT name FROM migrations ORDER BY name")] == [n for n, _ in real]
        rows = s.chunks("c", ids)
        assert len(rows) == len(ids) and all(r.title == "" and r.context is None for r in rows.values())
        hits = Retriever(s, embedder).search("c", "full moon ebb", k=1, mode="keyword")
        assert hits and "full moon" in hits[0].text
        verify.rebuild(s, "c", embedder.encode)
        got = s._vectors("c").get(ids=ids, include=["embeddings"])
    after = dict(zip(got["ids"], got["embeddings"]))
    for cid, v in zip(ids, vectors):
        assert float(np.dot(v, after[cid])) > 0.9999


def test_function_words_leave_the_keyword_leg_unless_nothing_else_is_asked(tmp_path, store, embedder):
    from rag.ingest import Ingestor

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("the the the the of the and the apple\n")
    (docs / "b.md").write_text("banana bread keeps for a week\n")
    Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([docs], "c")
    files = lambda hits: [h.source.rsplit("/", 1)[1] for h in hits]  # noqa: E731
    plain = Retriever(store, embedder, stopwords=False).search("c", "the banana", k=5, mode="keyword")
    assert "a.md" in files(plain)
    stop = Retriever(store, embedder, stopwords=True)
    assert files(stop.search("c", "the banana", k=5, mode="keyword")) == ["b.md"]
    # A query of nothing but function words still searches them.
    assert files(stop.search("c", "the and of", k=5, mode="keyword")) == ["a.md"]

"""Ingest reuses vectors it already has: a text that comes again in one run, the windows an edit
did not touch, a copy of a file the collection already holds."""
from __future__ import annotations

from rag.ingest import Ingestor

from .conftest import LICENSES, consistent


class Counting:
    """The real embedder, keeping every text it is asked to embed in `sent`."""

    def __init__(self, embedder):
        self.embedder, self.sent = embedder, []
        self.tokenizer, self.dimension, self.backend = embedder.tokenizer, embedder.dimension, embedder.backend

    def encode(self, texts):
        self.sent.extend(texts)
        return self.embedder.encode(texts)


def test_a_text_that_comes_again_in_one_run_is_embedded_once(store, embedder, tmp_path, monkeypatch):
    """A folder and its copy, far enough apart to be committed in different groups: every chunk of
    the copy takes the vector its original got, and only new text reaches the embedder."""
    import numpy as np

    import rag.ingest

    monkeypatch.setattr(rag.ingest, "GROUP_CHUNKS", 8)  # a group closes at 8 chunks: each copy lands in a later group than its original
    for folder in ("notes", "backup"):
        (tmp_path / folder).mkdir()
        for name in ("BSD", "MPL-2.0"):
            (tmp_path / folder / name).write_bytes((LICENSES / name).read_bytes())
    (tmp_path / "backup" / "extra.txt").write_text("Tide tables for the harbour, read at the full moon.\n")
    counting = Counting(embedder)
    sent = counting.sent

    s = Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run([tmp_path / "notes", tmp_path / "backup"], "c")
    assert len(s.ingested) == 5 and s.chunks == store.collection("c").chunks
    assert len(sent) == len(set(sent)), "no text is embedded twice"
    rows = store.chunks("c", store.chunk_ids("c")).values()
    vec = dict(store.vectors("c", [r.id for r in rows]))
    by_place = {(r.path.split("/")[-2], r.path.rsplit("/", 1)[-1], r.idx): vec[r.id] for r in rows}
    copies = [k for k in by_place if k[0] == "backup" and k[1] != "extra.txt"]
    assert len(sent) == len(by_place) - len(copies) and copies
    for _, name, idx in copies:
        assert np.array_equal(by_place[("backup", name, idx)], by_place[("notes", name, idx)])
    # With no room to keep vectors between groups, a copy in a later group still takes the vectors
    # its original's group wrote to the store; with that lookup off too, it is embedded again.
    monkeypatch.setattr(rag.ingest, "RUN_CACHE", 0)
    sent.clear()
    Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run([tmp_path / "notes", tmp_path / "backup"], "d")
    assert len(sent) == len(by_place) - len(copies)
    consistent(store, "d")
    rows_d = store.chunks("d", store.chunk_ids("d")).values()
    vec_d = dict(store.vectors("d", [r.id for r in rows_d]))
    place_d = {(r.path.split("/")[-2], r.path.rsplit("/", 1)[-1], r.idx): vec_d[r.id] for r in rows_d}
    for _, name, idx in copies:
        assert np.allclose(place_d[("backup", name, idx)], place_d[("notes", name, idx)], rtol=0, atol=1e-6)
    monkeypatch.setattr(rag.ingest, "TWINS", 0)
    sent.clear()
    Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run([tmp_path / "notes", tmp_path / "backup"], "e")
    assert len(sent) == len(by_place)


def test_an_edit_re_embeds_only_the_windows_it_touched(store, embedder, tmp_path):
    """A long file edited near its end: the windows before the edit keep their vectors, only the
    rest reach the embedder, and search finds the new words. A stored vector that is not unit
    length is never lent."""
    import numpy as np

    from rag.chunking import Chunk
    from rag.store import chunk_id

    doc = tmp_path / "docs" / "GPL-3"
    doc.parent.mkdir()
    text = (LICENSES / "GPL-3").read_text()
    doc.write_text(text)
    counting = Counting(embedder)
    sent = counting.sent

    first = Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run([doc.parent], "c")
    old = store.file("c", str(doc))
    before = dict(store.vectors("c", [chunk_id(old.path, old.sha256, i) for i in range(old.n_chunks)]))
    at = text.index("  16. Limitation of Liability.")
    doc.write_text(text[:at] + "  Harbour tide tables are read at the full moon.\n\n" + text[at:])
    # A damaged stored vector (zeroed) for the file's first window: it is embedded again, not lent.
    store._vectors("c").update(ids=[chunk_id(old.path, old.sha256, 0)], embeddings=[[0.0] * embedder.dimension])
    sent.clear()
    second = Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run([doc.parent], "c")
    assert second.ingested == [str(doc)] and second.chunks >= first.chunks
    new = store.file("c", str(doc))
    rows = store.chunks("c", [chunk_id(new.path, new.sha256, i) for i in range(new.n_chunks)])
    after = dict(store.vectors("c", list(rows)))
    kept = [i for i in range(1, new.n_chunks)
            if rows[chunk_id(new.path, new.sha256, i)].end <= at]  # wholly before the edit
    assert len(kept) > new.n_chunks * 0.6
    for i in kept:  # lent, not embedded again; equal to float32's rounding (the store renormalizes)
        row = rows[chunk_id(new.path, new.sha256, i)]
        assert Chunk(row.idx, row.start, row.end, row.text, row.heading, row.page, row.context).embedding_text() not in sent
        assert np.allclose(after[chunk_id(new.path, new.sha256, i)], before[chunk_id(old.path, old.sha256, i)],
                           rtol=0, atol=1e-6)
    assert 2 <= len(sent) <= new.n_chunks - len(kept), (len(sent), new.n_chunks, len(kept))
    assert abs(np.linalg.norm(after[chunk_id(new.path, new.sha256, 0)]) - 1) < 1e-4, "the zeroed window was re-embedded"
    consistent(store, "c")
    from rag.retrieve import Retriever

    hits = Retriever(store, embedder).search("c", "harbour tide tables full moon", k=1, mode="keyword")
    assert hits and "Harbour tide tables" in hits[0].text
    # The file's vectors gone from the store (an ingest killed between deleting and adding them):
    # nothing to lend, so the next edit embeds every window again and the store is whole.
    store._vectors("c").delete(ids=list(rows))
    doc.write_text(text)
    sent.clear()
    Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run([doc.parent], "c")
    assert len(sent) == store.file("c", str(doc)).n_chunks == first.chunks
    consistent(store, "c")


def test_a_copy_ingested_in_a_later_run_takes_the_stored_vectors(store, embedder, tmp_path, monkeypatch):
    """A folder ingested one day and a copy of it the next: the copy's windows take the vectors
    already stored for the same bytes (nothing reaches the embedder, even with no run cache; of
    two stored files with those bytes, the one with the same title is asked first), a renamed
    copy (another title, so another context) and a new file are embedded. A copy whose first
    stored twin lost its vectors borrows from the next; a moved folder borrows from its old place
    (gone from the disk, kept in the store: it may only be unmounted); with no stored vectors left, a copy is embedded whole."""
    import numpy as np

    import rag.ingest
    from rag.ingest import stored_under
    from rag.store import chunk_id

    (tmp_path / "notes").mkdir()
    for name in ("BSD", "MPL-2.0"):
        (tmp_path / "notes" / name).write_bytes((LICENSES / name).read_bytes())
    (tmp_path / "notes" / "0-BSD").write_bytes((LICENSES / "BSD").read_bytes())  # listed before BSD
    counting = Counting(embedder)
    sent = counting.sent

    def ingest(*folders):
        sent.clear()
        return Ingestor(store, lambda: counting, embedder_name="all-MiniLM-L6-v2").run(
            [tmp_path / f for f in folders], "c")

    first = ingest("notes")
    assert len(first.ingested) == 3 and len(sent) == first.chunks
    own = first.chunks - store.file("c", str(tmp_path / "notes" / "0-BSD")).n_chunks

    (tmp_path / "backup").mkdir()
    for name in ("BSD", "MPL-2.0"):
        (tmp_path / "backup" / name).write_bytes((LICENSES / name).read_bytes())
    (tmp_path / "backup" / "BSD-copy").write_bytes((LICENSES / "BSD").read_bytes())
    (tmp_path / "backup" / "extra.txt").write_text("Tide tables for the harbour, read at the full moon.\n")
    monkeypatch.setattr(rag.ingest, "RUN_CACHE", 0)
    monkeypatch.setattr(rag.ingest, "TWINS", 1)  # only the first twin is asked: the one with the title
    second = ingest("backup")
    assert len(second.ingested) == 4 and not second.failed
    renamed = store.file("c", str(tmp_path / "backup" / "BSD-copy")).n_chunks
    assert len(sent) == renamed + 1, "only the renamed copy and the new file were embedded"
    assert all(t.startswith("BSD-copy") or "Tide tables" in t for t in sent), sent
    rows = store.chunks("c", store.chunk_ids("c")).values()
    vec = dict(store.vectors("c", [r.id for r in rows]))
    by_place = {(r.path.split("/")[-2], r.path.rsplit("/", 1)[-1], r.idx): vec[r.id] for r in rows}
    copies = [k for k in by_place if k[0] == "backup" and k[1] in ("BSD", "MPL-2.0")]
    assert len(copies) == own
    for _, name, idx in copies:
        assert np.allclose(by_place[("backup", name, idx)], by_place[("notes", name, idx)], rtol=0, atol=1e-6)
    consistent(store, "c")
    monkeypatch.setattr(rag.ingest, "TWINS", 3)

    def drop_vectors(folder):
        gone = store.file("c", str(tmp_path / folder / "BSD"))
        store._vectors("c").delete(ids=[r.id for r in store.chunks("c", store.chunk_ids("c")).values()
                                        if r.path == gone.path])
        return gone.n_chunks

    def vectors_of(rec):
        ids = [chunk_id(rec.path, rec.sha256, i) for i in range(rec.n_chunks)]
        got = dict(store.vectors("c", ids))
        return np.stack([got[i] for i in ids])

    n = drop_vectors("backup")  # the first same-titled twin (by path) has nothing to lend
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "BSD").write_bytes((LICENSES / "BSD").read_bytes())
    ingest("third")
    assert sent == [], "notes/BSD lent what backup/BSD could not"
    assert np.allclose(vectors_of(store.file("c", str(tmp_path / "third" / "BSD"))),
                       vectors_of(store.file("c", str(tmp_path / "notes" / "BSD"))), rtol=0, atol=1e-6)

    drop_vectors("notes")
    (tmp_path / "third").rename(tmp_path / "fourth")
    moved = ingest("third", "fourth")  # named again after its move: its old place is kept (maybe unmounted)
    assert sent == [] and moved.ingested == [str(tmp_path / "fourth" / "BSD")] and not moved.removed
    assert moved.failed == [(str(tmp_path / "third"), "no such file or folder; the 1 file(s) stored from it stay in "
                             "the collection (`crofter collections forget c PATH` drops them)")]
    third, fourth = (store.file("c", str(tmp_path / f / "BSD")) for f in ("third", "fourth"))
    assert third is not None
    assert np.allclose(vectors_of(fourth), vectors_of(third), rtol=0, atol=1e-6)
    store.remove_files("c", stored_under(store, "c", tmp_path / "third"))  # `crofter collections forget`
    assert ingest("third").failed == [(str(tmp_path / "third"), "no such file or folder")]

    drop_vectors("fourth")  # no copy of BSD has stored vectors now
    (tmp_path / "fifth").mkdir()
    (tmp_path / "fifth" / "BSD").write_bytes((LICENSES / "BSD").read_bytes())
    ingest("fifth")
    assert len(sent) == n
    fifth = store.file("c", str(tmp_path / "fifth" / "BSD"))
    assert len(store.vectors("c", [r.id for r in store.chunks("c", store.chunk_ids("c")).values()
                                   if r.path == fifth.path])) == fifth.n_chunks

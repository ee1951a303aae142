"""Chunk context (what a chunk is embedded with), the title as a search field, the catalogue
migration that adds both, and the ONNX embedding backends (#17 items 2 and 4)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rag.chunking import CONTEXTS, Chunker, title_of
from rag.loaders import extract
from rag.retrieve import Retriever
from rag.store import Store

from ..app.test_cli import crofter
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


TEXTS = ["The licensee may distribute copies of the program.", "How tides follow the moon", "",
         "word " * 300, "Patent grants and their termination."]


def test_onnx_backends_agree_with_torch_and_cache_their_export(tmp_path, embedder):
    from rag.embed import EmbedError, Embedder

    ref = embedder.encode(TEXTS)
    cache = tmp_path / "onnx"
    fp32 = Embedder(device="cpu", backend="onnx", cache=cache)
    v = fp32.encode(TEXTS)
    assert v.shape == ref.shape and v.dtype == np.float32
    assert np.min(np.sum(v * ref, axis=1)) > 0.9999
    int8 = Embedder(device="cpu", backend="onnx-int8", cache=cache)
    c = np.sum(int8.encode(TEXTS) * ref, axis=1)
    assert c.min() > 0.95 and c.mean() > 0.97, c
    assert int8.encode([]).shape == (0, ref.shape[1])
    (folder,) = cache.iterdir()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["model-int8.onnx", "model.onnx"], files  # no temp file left behind
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    Embedder(device="cpu", backend="onnx", cache=cache)
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp, "the export is made once"
    # A damaged cached model is made again rather than failing every later run.
    (folder / "model-int8.onnx").write_bytes(b"not onnx")
    again = Embedder(device="cpu", backend="onnx-int8", cache=cache)
    assert np.sum(again.encode(TEXTS[:1]) * ref[:1]) > 0.95
    with pytest.raises(EmbedError, match="embedding backend 'tensorrt': expected one of auto, torch, torch-bf16, "
                                         "onnx, onnx-int8"):
        Embedder(device="cpu", backend="tensorrt")


def test_the_bf16_backend_gives_float32_unit_vectors_that_agree_with_float32(embedder):
    import torch

    from rag.embed import Embedder

    ref = embedder.encode(TEXTS)
    bf16 = Embedder(device="cpu", backend="torch-bf16")
    assert bf16.backend == "torch-bf16"
    linear = [m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(p.dtype == torch.float32 for p in embedder.model.parameters()), "the float32 model is its own"
    v = bf16.encode(TEXTS)
    assert v.shape == ref.shape and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    cos = np.sum(v * ref, axis=1)
    assert cos.min() > 0.999, cos
    # The same batch gives the same numbers (a different batch moves them by ~1e-3: padding).
    assert np.array_equal(bf16.encode(TEXTS), v)
    assert bf16.encode([]).shape == (0, ref.shape[1])


def test_auto_picks_bf16_only_on_a_cpu_that_has_it(tmp_path, monkeypatch):
    import rag.embed as embed

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not embed.native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert embed.native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu amx_tile amx_bf16\n")
    assert embed.native_bf16(str(info))
    assert not embed.native_bf16(str(tmp_path / "missing"))
    monkeypatch.setattr(embed, "native_bf16", lambda: True)
    assert embed.resolve_backend("auto", "cpu") == "torch-bf16"
    assert embed.resolve_backend("auto", "cuda") == "torch"
    assert embed.resolve_backend("torch", "cpu") == "torch"
    assert embed.resolve_backend("onnx-int8", "cpu") == "onnx-int8"
    monkeypatch.setattr(embed, "native_bf16", lambda: False)
    assert embed.resolve_backend("auto", "cpu") == "torch"
    assert embed.Embedder(device="cpu", backend="auto").backend == "torch"


@pytest.mark.parametrize("backend", ["onnx-int8", "torch-bf16"])
def test_ingest_and_search_with_a_faster_backend_from_the_config(tmp_path, crofter_home, backend):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(LICENSES / name, docs / name)
    crofter_home.mkdir(parents=True, exist_ok=True)
    (crofter_home / "config.toml").write_text(f'embed_backend = "{backend}"\n')
    r = crofter("ingest", str(docs), "-c", "lic", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["chunks"] > 0 and summary["backend"] == backend
    r = crofter("search", "Mozilla Public License", "-c", "lic", "-k", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["source"].endswith("MPL-2.0")
    exported = list((crofter_home / "cache" / "onnx").glob("*/model-int8.onnx"))
    assert bool(exported) == (backend == "onnx-int8")
    (crofter_home / "config.toml").write_text('embed_backend = "gpu-magic"\n')
    r = crofter("search", "x", "-c", "lic")
    assert r.returncode != 0 and "embed_backend" in r.stderr and "Traceback" not in r.stderr


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

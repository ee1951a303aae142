"""Chunks are exact spans of the extracted text, carry their heading and page, and overlap as asked."""
from __future__ import annotations

import pytest

from rag.chunking import Chunker
from rag.loaders import extract

from .conftest import LICENSES
from .pdf_build import write_pdf


def test_spans_are_exact_and_sized(embedder):
    ex = extract(LICENSES / "Apache-2.0")
    chunks = Chunker(embedder.tokenizer, size=64, overlap=16).split(ex)
    assert len(chunks) > 20
    for c in chunks:
        assert ex.text[c.start:c.end] == c.text
        n = len(embedder.tokenizer(c.text, add_special_tokens=False)["input_ids"])
        assert n <= 64 + 2  # re-tokenizing a cut span may merge at most a piece at either edge
    # Consecutive windows overlap: the next chunk starts before the previous ends.
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:]))
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_headings_and_pages_travel_with_chunks(embedder, tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Top\n\n" + "alpha words here. " * 80 + "\n\n## Sub\n\nbeta text.\n")
    ex = extract(md)
    chunks = Chunker(embedder.tokenizer, size=50, overlap=10).split(ex)
    assert {c.heading for c in chunks} == {"Top", "Top > Sub"}
    sub = [c for c in chunks if c.heading == "Top > Sub"]
    assert sub and "beta text." in sub[0].text
    assert sub[0].embedding_text().startswith("Top > Sub\n")
    pdf = write_pdf(tmp_path / "p.pdf", ["first page words", "second page words"])
    pc = Chunker(embedder.tokenizer).split(extract(pdf))
    assert [(c.page, c.text) for c in pc] == [(1, "first page words"), (2, "second page words")]


def test_bad_settings_refused(embedder):
    with pytest.raises(ValueError, match="overlap"):
        Chunker(embedder.tokenizer, size=32, overlap=32)
    with pytest.raises(ValueError, match="at least 8"):
        Chunker(embedder.tokenizer, size=4, overlap=0)

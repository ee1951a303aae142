"""Loaders and structure: every format gives text, sections with headings/pages, or a clear failure."""
from __future__ import annotations

import os
import zipfile

import pytest

from rag import loaders
from rag.loaders import LoadError, extract

from .pdf_build import write_pdf


def heading_at(ex, needle: str) -> str:
    off = ex.text.index(needle)
    return next(s.heading for s in ex.sections if s.start <= off < s.end)


def test_markdown_heading_paths_skip_fenced_code(tmp_path):
    md = tmp_path / "guide.md"
    md.write_text("Intro line.\n\n# Install\n\nUse pip.\n\n## From source\n\n```sh\n# not a heading\nmake\n```\n\n"
                  "Setext Title\n============\n\nBody text.\n")
    ex = extract(md)
    assert heading_at(ex, "Intro line") == ""
    assert heading_at(ex, "Use pip") == "Install"
    assert heading_at(ex, "make") == "Install > From source"
    assert heading_at(ex, "Body text") == "Setext Title"
    assert "# not a heading" not in [s.heading for s in ex.sections]
    # Sections tile the text without gaps or overlaps.
    assert ex.sections[0].start == 0 and ex.sections[-1].end == len(ex.text)
    assert all(a.end == b.start for a, b in zip(ex.sections, ex.sections[1:]))


def test_rst_levels_follow_first_appearance(tmp_path):
    rst = tmp_path / "doc.rst"
    rst.write_text("=====\nTitle\n=====\n\nLead.\n\nUsage\n-----\n\nRun it.\n\nDetails\n~~~~~~~\n\nMore.\n\nOther\n-----\n\nEnd.\n")
    ex = extract(rst)
    assert heading_at(ex, "Lead.") == "Title"
    assert heading_at(ex, "Run it.") == "Title > Usage"
    assert heading_at(ex, "More.") == "Title > Usage > Details"
    assert heading_at(ex, "End.") == "Title > Other"


def test_html_sections_drop_scripts_and_keep_text(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><head><title>T</title><style>p{}</style></head><body><h1>Guide</h1><p>First   para.</p>"
                    "<script>alert(1)</script><h2>Setup</h2><ul><li>one</li><li>two</li></ul><!-- hidden --></body></html>")
    ex = extract(page)
    assert "alert" not in ex.text and "hidden" not in ex.text and "p{}" not in ex.text
    assert "First para." in ex.text
    assert heading_at(ex, "First para.") == "Guide"
    assert heading_at(ex, "two") == "Guide > Setup"


def test_code_sections_are_definitions(tmp_path):
    py = tmp_path / "m.py"
    py.write_text("import os\n\n@decorator\ndef alpha(x):\n    return x\n\n\nclass Beta:\n    def gamma(self):\n        pass\n")
    ex = extract(py)
    assert heading_at(ex, "@decorator") == "def alpha"
    assert heading_at(ex, "def gamma") == "class Beta"
    js = tmp_path / "m.js"
    js.write_text("const a = 1;\nfunction hello() {\n  return 2;\n}\nexport class Thing {\n}\n")
    ex = extract(js)
    assert heading_at(ex, "return 2") == "function hello()"
    assert heading_at(ex, "export class").startswith("export class Thing")


def test_pdf_pages_are_sections(tmp_path):
    pdf = write_pdf(tmp_path / "two.pdf", ["Alpha page text", "Beta (second) page"])
    ex = extract(pdf)
    assert [s.page for s in ex.sections] == [1, 2]
    assert ex.text[ex.sections[1].start:ex.sections[1].end] == "Beta (second) page"


def test_docx_headings(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("Chapter One", level=1)
    d.add_paragraph("Opening words.")
    d.add_heading("Part A", level=2)
    d.add_paragraph("Inner words.")
    path = tmp_path / "w.docx"
    d.save(path)
    ex = extract(path)
    assert heading_at(ex, "Opening words.") == "Chapter One"
    assert heading_at(ex, "Inner words.") == "Chapter One > Part A"


def test_hostile_inputs_fail_with_reasons(tmp_path, monkeypatch):
    cases = {}
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    cases["bin.txt"] = "binary"
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\ntrailer garbage")
    cases["broken.pdf"] = "PDF"
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(100, 100)
    w.encrypt("secret-user-pw")
    with open(tmp_path / "locked.pdf", "wb") as fh:
        w.write(fh)
    cases["locked.pdf"] = "encrypted"
    (tmp_path / "fake.docx").write_bytes(b"not a zip at all")
    cases["fake.docx"] = "broken .docx"
    with zipfile.ZipFile(tmp_path / "bomb.docx", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("word/document.xml", b"\0" * (3 * 1024 * 1024))
    monkeypatch.setattr(loaders, "MAX_UNZIPPED_BYTES", 1024 * 1024)
    cases["bomb.docx"] = "decompression bomb"
    (tmp_path / "big.txt").write_text("x" * 5000)
    (tmp_path / "empty.md").write_text("   \n\n")
    cases["empty.md"] = "no text"
    os.mkfifo(tmp_path / "pipe.txt")
    cases["pipe.txt"] = "not a regular file"
    for name, reason in cases.items():
        with pytest.raises(LoadError, match=reason):
            extract(tmp_path / name)
    with pytest.raises(LoadError, match="size cap"):
        extract(tmp_path / "big.txt", max_bytes=1000)
    with pytest.raises(LoadError, match="not a regular file"):
        extract("/dev/zero")


def test_unknown_suffix_sniffed_as_text(tmp_path):
    (tmp_path / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02" * 10)
    assert loaders.supported(tmp_path / "GPL-3")
    assert not loaders.supported(tmp_path / "image.png")
    assert not loaders.supported(tmp_path / "blob.dat")
    assert not loaders.supported(tmp_path / ".hidden.md")


def test_crlf_and_latin1_text(tmp_path):
    f = tmp_path / "old.txt"
    f.write_bytes("caf\xe9 line one\r\nline two\r\n".encode("latin-1"))
    ex = extract(f)
    assert ex.text == "café line one\nline two\n"

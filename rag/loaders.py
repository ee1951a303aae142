"""Turn one file into plain text plus its structure (sections with heading paths and pages).

Every later step (chunking, citations) works on character offsets into the text
returned here, so a citation's ``start``/``end`` can always be checked against
``extract(path).text[start:end]``.

A file that cannot be read sensibly raises `LoadError` with a short reason
(``encrypted PDF``, ``binary file``, ``over the size cap``...); the ingester
records it as ``failed: <reason>`` and goes on with the batch.
"""
from __future__ import annotations

import ast
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Files bigger than this on disk are refused before anything reads them.
MAX_FILE_BYTES = 50 * 1024 * 1024
# Extracted text longer than this is refused: what a decompression bomb looks like
# once it has been parsed (a 1 MB .docx expanding to gigabytes of XML, a PDF whose
# streams inflate without end).
MAX_TEXT_CHARS = 20_000_000
# A zip container (docx) whose members would inflate past this is refused unread.
MAX_UNZIPPED_BYTES = 200 * 1024 * 1024
# Wall-clock budget per file, checked between HTML blocks and PDF pages (no thread is killed).
MAX_SECONDS = 30.0
# One PDF stream may inflate to this much (pypdf's own limit, 75 MB by default, lets a
# whitespace bomb cost ~30 s of parsing); a page's content may hold this many tokens.
MAX_PDF_STREAM_BYTES = 8 * 1024 * 1024
MAX_PDF_TOKENS = 100_000

TEXT_SUFFIXES = {".txt", ".text", ".log", ".csv", ".tsv", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg", ""}
MARKDOWN_SUFFIXES = {".md", ".markdown", ".mdown"}
RST_SUFFIXES = {".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
CODE_SUFFIXES = {
    ".py", ".pyi", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".go", ".rs", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".java", ".kt", ".rb", ".php", ".cs", ".swift", ".scala", ".sh", ".bash", ".lua", ".pl", ".r", ".sql",
}
SUPPORTED = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | RST_SUFFIXES | HTML_SUFFIXES | CODE_SUFFIXES | {".pdf", ".docx"}


class LoadError(Exception):
    """This file cannot be ingested; str(exc) is the reason shown to the user."""


@dataclass(frozen=True)
class Section:
    """A span of the extracted text under one heading path (and, for PDFs, on one page)."""

    start: int
    end: int
    heading: str = ""  # "Install > From source"; "" when the format has none
    page: int | None = None  # 1-based PDF page


@dataclass
class Extracted:
    text: str
    sections: list[Section] = field(default_factory=list)
    kind: str = "text"


# Never sniffed during a folder walk: known binary formats.
BINARY_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".svgz", ".zip", ".gz", ".bz2", ".xz", ".zst", ".tar",
    ".7z", ".rar", ".so", ".o", ".a", ".dll", ".exe", ".bin", ".pyc", ".class", ".jar", ".whl", ".gguf", ".safetensors",
    ".pt", ".pth", ".onnx", ".sqlite", ".sqlite3", ".db", ".mp3", ".mp4", ".wav", ".ogg", ".flac", ".mkv", ".avi",
    ".mov", ".ttf", ".otf", ".woff", ".woff2", ".doc", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".iso", ".img",
}


def supported(path: Path) -> bool:
    """Whether a folder walk should pick this file up (explicitly named files are always tried).

    Known suffixes decide; a file with an unknown suffix (``LICENSE``, ``GPL-3``,
    ``notes.1``) is taken when its first 8 KiB look like text."""
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in SUPPORTED:
        return True
    if suffix in BINARY_SUFFIXES or not path.is_file():  # never open a FIFO or device to sniff it
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
        _decode(head)
        return bool(head.strip())
    except (OSError, LoadError):
        return False


def extract(path: str | Path, max_bytes: int = MAX_FILE_BYTES, max_seconds: float = MAX_SECONDS) -> Extracted:
    """Read `path` and return its text and sections, or raise LoadError.

    Memory stays within a small multiple of `max_bytes` (HTML is parsed as a stream, PDF
    streams are capped as they inflate); time within `max_seconds` plus one HTML block or
    one PDF page.

    >>> ex = extract("README.md")                      # doctest: +SKIP
    >>> ex.sections[0].heading, ex.text[ex.sections[0].start:][:20]
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise LoadError(f"cannot read: {exc.strerror or exc}") from None
    if not path.is_file():
        raise LoadError("not a regular file")
    if st.st_size > max_bytes:
        raise LoadError(f"over the size cap ({st.st_size} bytes > {max_bytes})")
    suffix = path.suffix.lower()
    deadline = time.monotonic() + max_seconds
    if suffix == ".pdf":
        out = _pdf(path, deadline, max_seconds)
    elif suffix == ".docx":
        out = _docx(path)
    else:
        raw = _read_bytes(path)
        text = _decode(raw)
        if suffix in MARKDOWN_SUFFIXES:
            out = Extracted(text, markdown_sections(text), "markdown")
        elif suffix in RST_SUFFIXES:
            out = Extracted(text, rst_sections(text), "rst")
        elif suffix in HTML_SUFFIXES:
            out = _html(text, deadline, max_seconds)
        elif suffix in CODE_SUFFIXES:
            out = Extracted(text, code_sections(text, suffix), "code")
        else:
            out = Extracted(text, [Section(0, len(text))] if text else [], "text")
    if len(out.text) > MAX_TEXT_CHARS:
        raise LoadError(f"extracted text over the cap ({len(out.text)} chars > {MAX_TEXT_CHARS}); a decompression bomb?")
    if not out.text.strip():
        raise LoadError("no text in the file")
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LoadError(f"cannot read: {exc.strerror or exc}") from None


def _decode(raw: bytes) -> str:
    """UTF-8 (with or without BOM), else Latin-1 if it looks like text; NUL bytes mean binary.

    A file that is mostly UTF-8 with a few broken bytes keeps its UTF-8 text, with U+FFFD
    for the broken bytes (decoding it as Latin-1 would garble every accented letter)."""
    if b"\x00" in raw[:8192]:
        raise LoadError("binary file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        if sum(1 for ch in text if ord(ch) > 127) - bad <= bad:  # more broken sequences than good ones
            text = raw.decode("latin-1")
            # C0 controls other than whitespace, and C1 (0x7f-0x9f), do not occur in Latin-1 prose.
            head = text[:8192]
            controls = sum(1 for ch in head if (ord(ch) < 32 and ch not in "\t\n\r\f") or 127 <= ord(ch) < 160)
            if controls > len(head) * 0.05:
                raise LoadError("binary file") from None
    # Offsets are into the text with newlines normalised, which is what every parser sees.
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- structure -----------------------------------------------------------------------------------

_ATX = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^(```|~~~)")


def _heading_sections(text: str, marks: list[tuple[int, int, str]]) -> list[Section]:
    """Sections from (offset, level, title) heading marks: each runs to the next heading."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    if not marks or marks[0][0] > 0:
        first = marks[0][0] if marks else len(text)
        if text[:first].strip():
            sections.append(Section(0, first, ""))
    for i, (off, level, title) in enumerate(marks):
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title.strip()))
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        sections.append(Section(off, end, " > ".join(t for _, t in stack)))
    return sections


def markdown_sections(text: str) -> list[Section]:
    """ATX (``## Title``) and setext (``Title`` over ``===``/``---``) headings; fenced code is skipped."""
    marks: list[tuple[int, int, str]] = []
    in_fence = False
    offset = 0
    lines = text.split("\n")
    prev: tuple[int, str] | None = None  # (offset, line) of the previous non-blank line
    for line in lines:
        stripped = line.strip()
        if _FENCE.match(stripped):
            in_fence = not in_fence
        elif not in_fence:
            m = _ATX.match(line)
            if m:
                marks.append((offset, len(m.group(1)), m.group(2)))
            elif prev is not None and stripped and set(stripped) <= {"="} and len(stripped) >= 3:
                marks.append((prev[0], 1, prev[1]))
            elif prev is not None and stripped and set(stripped) <= {"-"} and len(stripped) >= 3 and prev[1].strip():
                marks.append((prev[0], 2, prev[1]))
        prev = (offset, line) if stripped and not in_fence else None
        offset += len(line) + 1
    return _heading_sections(text, marks)


_RST_UNDERLINE = re.compile(r"^([=\-`:'\"~^_*+#<>])\1{2,}\s*$")


def rst_sections(text: str) -> list[Section]:
    """reStructuredText titles: a line underlined (optionally overlined) by a repeated punctuation
    character; levels follow the order in which each style first appears, as docutils does."""
    lines = text.split("\n")
    offsets = []
    off = 0
    for line in lines:
        offsets.append(off)
        off += len(line) + 1
    styles: list[tuple[str, bool]] = []
    marks: list[tuple[int, int, str]] = []
    i = 0
    while i < len(lines) - 1:
        title, under = lines[i], lines[i + 1]
        m = _RST_UNDERLINE.match(under)
        if title.strip() and not _RST_UNDERLINE.match(title) and m and len(under.rstrip()) >= len(title.rstrip()):
            over = i > 0 and lines[i - 1].strip() == under.strip()
            style = (m.group(1), over)
            if style not in styles:
                styles.append(style)
            start = offsets[i - 1] if over else offsets[i]
            marks.append((start, styles.index(style) + 1, title.strip()))
            i += 2
            continue
        i += 1
    return _heading_sections(text, marks)


_DEF_LINE = re.compile(
    r"^(?:export\s+)?(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:static\s+)?"
    r"(?:def|class|function|func|fn|impl|struct|enum|trait|interface|module|type|sub)\s+([A-Za-z_][\w.:<>]*)"
)


def code_sections(text: str, suffix: str) -> list[Section]:
    """Top-level definitions: Python through `ast` (exact), other languages by a
    definition keyword at column 0; a function or class is one section."""
    if suffix in (".py", ".pyi") and len(text) <= 2_000_000:  # an AST costs ~50x its source in memory
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            tree = None
        if tree is not None:
            line_off = [0]
            for line in text.split("\n"):
                line_off.append(line_off[-1] + len(line) + 1)
            marks = []
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    marks.append((line_off[first - 1], 1, f"{kind} {node.name}"))
            return _heading_sections(text, marks)
    marks = []
    offset = 0
    for line in text.split("\n"):
        m = _DEF_LINE.match(line)
        if m:
            marks.append((offset, 1, line.strip().rstrip("{").strip()[:80]))
        offset += len(line) + 1
    return _heading_sections(text, marks)


def _html(source: str, deadline: float = float("inf"), cap_s: float = MAX_SECONDS) -> Extracted:
    """Visible text of an HTML page, one section per h1-h6 heading (scripts and styles dropped),
    parsed as a stream with the time and text caps checked between blocks."""
    from .html_text import html_text

    def check(done: int, size: int) -> None:
        if time.monotonic() > deadline:
            raise LoadError(f"took over the time cap ({cap_s:g} s) after {done} of {len(source)} chars")
        if size > MAX_TEXT_CHARS:
            raise LoadError(f"extracted text over the cap ({MAX_TEXT_CHARS} chars); a decompression bomb?")

    text, marks = html_text(source, check)
    return Extracted(text, _heading_sections(text, marks), "html")


def _pdf(path: Path, deadline: float = float("inf"), cap_s: float = MAX_SECONDS) -> Extracted:
    """Text per page through pypdf; pages are joined by a blank line and each is one section.

    pypdf's own limits do the capping (it honours them while it inflates and parses):
    a stream inflating past MAX_PDF_STREAM_BYTES or a page past MAX_PDF_TOKENS tokens
    fails the file, and the time cap is checked between pages."""
    try:
        from pypdf import PdfReader, apply_configuration
        from pypdf.errors import LimitReachedError
    except ImportError:  # pragma: no cover - a dependency
        raise LoadError("PDF support needs pypdf") from None
    cap = MAX_PDF_STREAM_BYTES
    limits = dict(zlib_maximum_output_length=cap, lzw_maximum_output_length=cap, run_length_maximum_output_length=cap,
                  array_based_stream_maximum_output_length=cap, brotli_maximum_output_length=cap,
                  stream_decoding_work_maximum_length=4 * cap, stream_parsing_work_maximum_count=MAX_PDF_TOKENS)
    n = 0
    try:
        with apply_configuration(**limits):
            reader = PdfReader(str(path), strict=False)
            if reader.is_encrypted:
                # An empty user password opens many "encrypted" PDFs (permissions only).
                try:
                    ok = reader.decrypt("")
                except Exception:
                    ok = 0
                if not ok:
                    raise LoadError("encrypted PDF (needs a password)")
            texts = []
            total = 0
            for n, page in enumerate(reader.pages, 1):
                if time.monotonic() > deadline:
                    raise LoadError(f"took over the time cap ({cap_s:g} s) at page {n}")
                t = (page.extract_text() or "").replace("\r\n", "\n").replace("\r", "\n")
                total += len(t)
                if total > MAX_TEXT_CHARS:
                    raise LoadError(f"extracted text over the cap ({MAX_TEXT_CHARS} chars); a decompression bomb?")
                texts.append(t)
    except LoadError:
        raise
    except LimitReachedError as exc:
        where = f"page {n}: " if n else ""
        if "decompress" in str(exc).lower():
            raise LoadError(f"{where}a stream inflates past the cap ({cap} bytes); a decompression bomb?") from None
        raise LoadError(f"{where}over a PDF parsing cap ({str(exc)[:80]} cap {MAX_PDF_TOKENS} tokens per "
                        "stream); a pathological page?") from None
    except Exception as exc:  # pypdf raises many kinds on hostile files; all mean "broken"
        raise LoadError(f"broken PDF ({type(exc).__name__}: {str(exc)[:120]})") from None
    sections = []
    parts = []
    offset = 0
    for n, t in enumerate(texts, 1):
        if n > 1:
            parts.append("\n\n")
            offset += 2
        parts.append(t)
        if t.strip():
            sections.append(Section(offset, offset + len(t), "", n))
        offset += len(t)
    return Extracted("".join(parts), sections, "pdf")


def _docx(path: Path) -> Extracted:
    """Paragraphs of a Word file; ``Heading N`` paragraph styles give the sections."""
    try:
        with zipfile.ZipFile(path) as zf:
            inflated = sum(i.file_size for i in zf.infolist())
            if inflated > MAX_UNZIPPED_BYTES:
                raise LoadError(f"unzips to {inflated} bytes (> {MAX_UNZIPPED_BYTES}); a decompression bomb?")
    except zipfile.BadZipFile:
        raise LoadError("broken .docx (not a zip file)") from None
    try:
        import docx
    except ImportError:  # pragma: no cover - a dependency
        raise LoadError(".docx support needs python-docx") from None
    try:
        document = docx.Document(str(path))
        paras = [(p.text, (p.style.name if p.style is not None else "") or "") for p in document.paragraphs]
    except Exception as exc:
        raise LoadError(f"broken .docx ({type(exc).__name__}: {str(exc)[:120]})") from None
    parts: list[str] = []
    marks: list[tuple[int, int, str]] = []
    size = 0
    for text, style in paras:
        m = re.fullmatch(r"Heading (\d)", style)
        if m and text.strip():
            marks.append((size, int(m.group(1)), text.strip()))
        parts.append(text + "\n")
        size += len(text) + 1
    text = "".join(parts)
    return Extracted(text, _heading_sections(text, marks), "docx")

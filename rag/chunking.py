"""Chunks: structure first (the loader's sections), then windows of embedding-model tokens.

Windows are cut on token boundaries from the tokenizer's offset mapping, so every
chunk is exactly ``text[start:end]`` of the extracted text: the span a citation shows.

Worked example with size=4, overlap=1 over tokens t0..t9 of one section:
windows [t0..t3] [t3..t6] [t6..t9]; each chunk runs from the first token's start
offset to the last token's end offset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .loaders import Extracted

# What a chunk is embedded with besides its own text (bench/bench_retrieval.py measures each):
# nothing, its heading path, its document's title, both, or both and the sentence before it.
CONTEXTS = ("none", "heading", "title", "title+heading", "title+heading+previous")
DEFAULT_CONTEXT = "title+heading"  # bench_retrieval: license recall@5 0.800 -> 0.933 over "heading"
DEFAULT_SIZE = 128  # tokens: all-MiniLM-L6-v2 was trained on 128-token inputs (it reads up to 256)
DEFAULT_OVERLAP = 24
PIECE_CHARS = 100_000  # a longer section is tokenized in pieces of at most this many chars
BATCH_CHARS = 1_000_000  # chars handed to the tokenizer per call


@dataclass(frozen=True)
class Chunk:
    index: int  # position within its file
    start: int  # character offsets into the extracted text
    end: int
    text: str
    heading: str = ""
    page: int | None = None
    # What the passage is read with but never shows (see CONTEXTS); None: its heading path, as
    # every chunk was embedded before contexts existed.
    context: str | None = None
    title: str = ""  # its document's title (searched as a field of its own)

    def embedding_text(self) -> str:
        """What the embedder sees: the chunk with its context (a heading path gives a passage its topic)."""
        ctx = self.heading if self.context is None else self.context
        return f"{ctx}\n{self.text}" if ctx else self.text


class Chunker:
    def __init__(self, tokenizer, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP,
                 context: str = DEFAULT_CONTEXT):
        if context not in CONTEXTS:
            raise ValueError(f"chunk context must be one of {', '.join(CONTEXTS)}")
        if size < 8:
            raise ValueError("chunk size must be at least 8 tokens")
        if not 0 <= overlap < size:
            raise ValueError("chunk overlap must be >= 0 and smaller than the chunk size")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the embedding model needs a fast (Rust) tokenizer for character offsets")
        self.tokenizer = tokenizer
        self.size = size
        self.overlap = overlap
        self.context = context

    def split(self, doc: Extracted, title: str = "") -> list[Chunk]:
        # Long sections are tokenized in pieces cut at a line break, and pieces in batches of
        # about BATCH_CHARS: the offset mapping of a 20M-char text would cost gigabytes at once.
        spans = [(a, b, s.heading, s.page) for s in doc.sections if doc.text[s.start:s.end].strip()
                 for a, b in _pieces(doc.text, s.start, s.end)]
        chunks: list[Chunk] = []
        step = self.size - self.overlap
        i = 0
        while i < len(spans):
            j, total = i, 0
            while j < len(spans) and (j == i or total + spans[j][1] - spans[j][0] <= BATCH_CHARS):
                total += spans[j][1] - spans[j][0]
                j += 1
            group = spans[i:j]
            enc = self.tokenizer([doc.text[a:b] for a, b, _, _ in group], add_special_tokens=False,
                                 return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False)
            for (base, _, heading, page), offsets in zip(group, enc["offset_mapping"]):
                offsets = [o for o in offsets if o[1] > o[0]]
                k = 0
                while offsets:
                    window = offsets[k:k + self.size]
                    start, end = base + window[0][0], base + window[-1][1]
                    ctx = _context(self.context, title, heading, doc.text, base, start)
                    chunks.append(Chunk(len(chunks), start, end, doc.text[start:end], heading, page, ctx, title))
                    if k + self.size >= len(offsets):
                        break
                    k += step
            i = j
        return chunks


def _pieces(text: str, start: int, end: int, limit: int = PIECE_CHARS):
    """(start, end) spans of at most `limit` chars tiling text[start:end], cut after a newline
    (else a space) in the second half of each span when there is one."""
    while end - start > limit:
        cut = text.rfind("\n", start + limit // 2, start + limit)
        if cut < 0:
            cut = text.rfind(" ", start + limit // 2, start + limit)
        cut = cut + 1 if cut >= 0 else start + limit
        yield start, cut
        start = cut
    yield start, end


def _context(mode: str, title: str, heading: str, text: str, section_start: int, start: int) -> str:
    if mode == "none":
        return ""
    if mode == "heading":
        return heading
    if mode == "title":
        return title
    parts = [title] if title and not heading.startswith(title) else []
    if heading:
        parts.append(heading)
    ctx = " > ".join(parts)
    if mode == "title+heading+previous" and start > section_start:
        before = text[max(section_start, start - 300):start]
        cut = max(before.rfind(". ", 0, len(before) - 2), before.rfind("\n", 0, len(before) - 2))
        previous = " ".join(before[cut + 1:].split())
        if previous:
            ctx = f"{ctx}\n{previous}" if ctx else previous
    return ctx


def title_of(path) -> str:
    """A document's title for its chunks' context: the file name without its suffix, words apart."""
    return " ".join(Path(path).stem.replace("_", " ").split())

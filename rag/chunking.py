"""Chunks: structure first (the loader's sections), then windows of embedding-model tokens.

Windows are cut on token boundaries from the tokenizer's offset mapping, so every
chunk is exactly ``text[start:end]`` of the extracted text: the span a citation shows.

Worked example with size=4, overlap=1 over tokens t0..t9 of one section:
windows [t0..t3] [t3..t6] [t6..t9]; each chunk runs from the first token's start
offset to the last token's end offset.
"""
from __future__ import annotations

from dataclasses import dataclass

from .loaders import Extracted

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

    def embedding_text(self) -> str:
        """What the embedder sees: the heading path gives a passage its context."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


class Chunker:
    def __init__(self, tokenizer, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP):
        if size < 8:
            raise ValueError("chunk size must be at least 8 tokens")
        if not 0 <= overlap < size:
            raise ValueError("chunk overlap must be >= 0 and smaller than the chunk size")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the embedding model needs a fast (Rust) tokenizer for character offsets")
        self.tokenizer = tokenizer
        self.size = size
        self.overlap = overlap

    def split(self, doc: Extracted) -> list[Chunk]:
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
                    chunks.append(Chunk(len(chunks), start, end, doc.text[start:end], heading, page))
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

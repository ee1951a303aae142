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
        sections = [s for s in doc.sections if doc.text[s.start:s.end].strip()]
        if not sections:
            return []
        texts = [doc.text[s.start:s.end] for s in sections]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=False)
        chunks: list[Chunk] = []
        step = self.size - self.overlap
        for sec, offsets in zip(sections, enc["offset_mapping"]):
            offsets = [o for o in offsets if o[1] > o[0]]
            if not offsets:
                continue
            i = 0
            while True:
                window = offsets[i:i + self.size]
                start, end = sec.start + window[0][0], sec.start + window[-1][1]
                chunks.append(Chunk(len(chunks), start, end, doc.text[start:end], sec.heading, sec.page))
                if i + self.size >= len(offsets):
                    break
                i += step
        return chunks

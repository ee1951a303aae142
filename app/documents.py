"""The app's door to rag/: where the store lives, which embedder, and grounded turns.

rag/ knows nothing of crofter's data dir or settings; this module passes them in.
Everything heavy (chromadb, torch, sentence-transformers) is imported on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models import paths


def store_root() -> Path:
    return paths.data_dir() / "rag"


def open_store(settings):
    from rag.store import Store

    return Store(store_root(), chroma_url=settings.chroma_url or None)


_EMBEDDERS: dict[str, object] = {}


def embedder(name: str):
    """One loaded embedder per name per process (loading costs ~0.5 s and 90 MB)."""
    from rag.embed import Embedder

    if name not in _EMBEDDERS:
        _EMBEDDERS[name] = Embedder(name)
    return _EMBEDDERS[name]


def ingestor(store, settings, collection: str, embedder_name: str | None = None, **kw):
    from rag.ingest import Ingestor

    info = store.collection(collection)
    name = embedder_name or (info.embedder if info else settings.embedder)
    return Ingestor(store, lambda: embedder(name), embedder_name=name, **kw)


def retriever(store, settings, collection: str):
    from rag.embed import Reranker
    from rag.retrieve import Retriever

    info = store.require(collection)
    rer = Reranker(settings.reranker) if settings.reranker else None
    return Retriever(store, embedder(info.embedder), reranker=rer)


def collection_search(store, settings, collections: list[str]):
    """`search(query, k)` over several collections: the best k hits by score."""
    retrievers = {c: retriever(store, settings, c) for c in collections}

    def search(query: str, k: int):
        hits = [h for c, r in retrievers.items() for h in r.search(c, query, k=k)]
        return sorted(hits, key=lambda h: h.score, reverse=True)[:k]

    return search


@dataclass
class GroundedTurn:
    """What a question over documents produced: the prompt sent, all retrieved sources and the cited ones."""

    question: str
    prompt: str
    sources: list = field(default_factory=list)
    cited: list = field(default_factory=list)

    def finish(self, reply: str) -> None:
        from rag.cite import cited_sources

        self.cited = cited_sources(reply, self.sources)


def grounded_prompt(search, question: str, k: int, max_chars: int) -> GroundedTurn:
    """Retrieve with `search(question, k)` (see collection_search) and number the passages."""
    from rag.cite import build_prompt

    prompt, sources = build_prompt(question, search(question, k), max_chars=max_chars)
    return GroundedTurn(question, prompt, sources)


def source_budget_chars(n_ctx: int, max_tokens: int) -> int:
    """Characters of quoted passages that fit beside the reply reserve (about 3.5 chars per token,
    with a quarter of the window kept for the system prompt, question and history)."""
    return max(800, int((n_ctx - max_tokens) * 0.75 * 3.5))

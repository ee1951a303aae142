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


def embedder(name: str, backend: str = "auto"):
    """One loaded embedder per name and backend per process (loading costs ~0.5 s and 90 MB).
    An ONNX backend's exported model is kept under the data dir's cache/onnx, made on first use."""
    from rag.embed import Embedder

    key = f"{name}\0{backend}"
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder(name, backend=backend, cache=paths.data_dir() / "cache" / "onnx")
    return _EMBEDDERS[key]


def ingestor(store, settings, collection: str, embedder_name: str | None = None, **kw):
    from rag.ingest import Ingestor

    info = store.collection(collection)
    name = embedder_name or (info.embedder if info else settings.embedder)
    return Ingestor(store, lambda: embedder(name, settings.embed_backend), embedder_name=name, **kw)


_RERANKERS: dict[tuple[Path, str], object] = {}


def reranker(name: str, embed_backend: str = "auto"):
    """The cross-encoder `name` names (a model store name, e.g. one `crofter models pull` fetched,
    or a folder), loaded once per process; None for "" or "none". It is compiled by OpenVINO where
    the embedder would be (`embed_backend` auto or openvino, on a CPU), its export kept beside the
    embedder's under the data dir's cache/onnx; torch runs it otherwise."""
    name = name.strip()
    if name.lower() in ("", "none"):
        return None
    from models.registry import Registry
    from rag.rerank import Reranker

    path = Registry().resolve_kind(name, "hf", "a reranker is a cross-encoder folder").resolve()
    backend = "auto" if embed_backend in ("auto", "openvino") else "torch"
    if (path, backend) not in _RERANKERS:
        _RERANKERS[path, backend] = Reranker(path, backend=backend, cache=paths.data_dir() / "cache" / "onnx")
    return _RERANKERS[path, backend]


def retriever(store, settings, collection: str):
    from rag.retrieve import Retriever

    info = store.require(collection)
    rer = reranker(settings.reranker, settings.embed_backend)  # before the embedder: a wrong name fails at once
    return Retriever(store, embedder(info.embedder, settings.embed_backend), reranker=rer)


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


def grounder(search, k: int):
    """`ground(question, n_ctx, max_tokens)` for turn.run_turn: the question with k numbered
    passages, sized for the engine's window and reply budget (the one grounding of every turn)."""

    def ground(question: str, n_ctx: int, max_tokens: int) -> GroundedTurn:
        return grounded_prompt(search, question, k, source_budget_chars(n_ctx, max_tokens))

    return ground


def source_budget_chars(n_ctx: int, max_tokens: int) -> int:
    """Characters of quoted passages that fit beside the reply reserve (about 3.5 chars per token,
    with a quarter of the window kept for the system prompt, question and history)."""
    return max(800, int((n_ctx - max_tokens) * 0.75 * 3.5))


class DocsService:
    """Documents for the chat app: one store handle, retrievers, background ingestion.

    The store is opened on first use (it takes the data dir's document lock) and
    every method may be called from worker threads; the UI thread only reads
    `ingesting` to show progress.
    """

    def __init__(self, settings):
        import threading

        self.settings = settings
        self._store = None
        self._search_cache: dict[tuple, object] = {}
        self._lock = threading.RLock()
        self.ingesting: dict[str, object] = {}  # collection -> rag.ingest.Progress while a job runs
        self._stop = threading.Event()

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                self._store = open_store(self.settings)
            return self._store

    def collections(self):
        return self.store.collections()

    def search(self, names: list[str]):
        key = tuple(names)
        with self._lock:
            if key not in self._search_cache:
                self._search_cache[key] = collection_search(self.store, self.settings, list(names))
            return self._search_cache[key]

    def grounder(self, names: list[str]):
        return grounder(self.search(names), self.settings.rag_top_k)

    def incomplete(self, names: list[str]) -> list[str]:
        """Attached collections whose index is still being built, as "name (files done/total)"."""
        out = []
        for n in names:
            p = self.ingesting.get(n)
            if p is not None:
                out.append(f"{n} ({p.files_done}/{p.files_total} files)")
        return out

    def ingest(self, paths: list[str], collection: str, on_progress=None, on_done=None):
        """Start a background ingestion thread; `on_done(summary, error)` is called from it."""
        import threading

        from rag.ingest import Progress
        from rag.store import RagError, check_name

        check_name(collection)
        if collection in self.ingesting:
            raise RagError(f"collection {collection!r} is already being ingested")
        self.ingesting[collection] = Progress()

        def job():
            summary, error = None, None
            try:
                ing = ingestor(self.store, self.settings, collection)

                def progress(p):
                    self.ingesting[collection] = p
                    if on_progress:
                        on_progress(collection, p)

                summary = ing.run(paths, collection, on_progress=progress, should_stop=self._stop.is_set)
                with self._lock:
                    self._search_cache.clear()
            except Exception as exc:  # reported to the user by on_done
                error = str(exc)
            finally:
                self.ingesting.pop(collection, None)
            if on_done:
                on_done(collection, summary, error)

        t = threading.Thread(target=job, name=f"ingest-{collection}", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def read_passage(source: dict, context_chars: int = 600) -> tuple[str, str, str]:
    """(before, passage, after) of a cited source, re-extracted from the file on disk.

    The file may have changed since it was ingested; then the stored passage text is
    shown with a note instead of a wrong span."""
    from rag.loaders import LoadError, extract

    try:
        text = extract(source["source"]).text
    except LoadError as exc:
        return "", source["text"], f"\n\n(the file cannot be read now: {exc})"
    start, end = source["start"], source["end"]
    if text[start:end] != source["text"]:
        return "", source["text"], "\n\n(the file changed since it was ingested; this is the indexed text)"
    return text[max(0, start - context_chars):start], text[start:end], text[end:end + context_chars]

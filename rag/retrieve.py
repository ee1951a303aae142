"""Hybrid retrieval: dense (Chroma) and keyword (SQLite FTS5 BM25) fused by reciprocal rank.

RRF (Cormack, Clarke & Buettcher, SIGIR 2009): score(d) = sum over rankings r of
1 / (K + rank_r(d)). It needs no score calibration between BM25 and cosine, which is why
an exact rare term that the dense model blurs still surfaces. K = 10 rather than the
paper's 60, and no stopword list: what bench/bench_retrieval.py --grid found on its tuning
set (docs/benchmarks.md, session 9); 50 candidates per leg, equal weights.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, replace

from .store import Store

RRF_K = 10
MODES = ("hybrid", "dense", "keyword")


@dataclass(frozen=True)
class Hit:
    source: str
    page: int | None
    heading: str
    start: int
    end: int
    text: str
    score: float
    id: str = ""
    # The same passage found elsewhere (another copy of the file, a repeated section): shown and
    # cited once, with every place it appears. Each is (source, page, heading, start, end).
    also: tuple[tuple, ...] = ()

    def as_dict(self) -> dict:
        d = {"source": self.source, "page": self.page, "heading": self.heading, "start": self.start,
             "end": self.end, "text": self.text, "score": round(self.score, 6)}
        if self.also:
            d["also"] = [dict(zip(("source", "page", "heading", "start", "end"), a)) for a in self.also]
        return d

    def sources(self) -> list[str]:
        """Every file the passage is in, this hit's first."""
        return list(dict.fromkeys([self.source, *(a[0] for a in self.also)]))

    def where(self) -> str:
        """"notes.md > Install, chars 120-480" / "paper.pdf p. 3, chars ..." for listings."""
        loc = self.source
        if self.page is not None:
            loc += f" p. {self.page}"
        if self.heading:
            loc += f" > {self.heading}"
        return f"{loc}, chars {self.start}-{self.end}" + (f" (also in {len(self.also)} more)" if self.also else "")


def passage_key(text: str) -> str:
    """Identical and near-identical passages (case and whitespace aside) share this key."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def collapse(hits: list[Hit]) -> list[Hit]:
    """Each passage once, at its best rank, listing the other places it was found."""
    out: list[Hit] = []
    first: dict[str, int] = {}
    for h in hits:
        key = passage_key(h.text)
        if key in first:
            i = first[key]
            out[i] = replace(out[i], also=(*out[i].also, (h.source, h.page, h.heading, h.start, h.end), *h.also))
        else:
            first[key] = len(out)
            out.append(h)
    return out


def rrf(rankings: list[list[str]], k: int = RRF_K, weights=None) -> dict[str, float]:
    """>>> rrf([["a", "b"], ["b", "c"]], k=60)["b"] == 1/62 + 1/61
    True"""
    scores: dict[str, float] = {}
    for i, ranking in enumerate(rankings):
        w = weights[i] if weights else 1.0
        for rank, cid in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + w / (k + rank)
    return scores


@functools.lru_cache(maxsize=1)
def _stopwords() -> frozenset:
    """English function words (scikit-learn's list, a sentence-transformers dependency): left out of
    the keyword leg, where "how", "the" and "does" would rank passages that say them most."""
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError:  # pragma: no cover - installed with sentence-transformers
        return frozenset()
    return frozenset(ENGLISH_STOP_WORDS)


def _without(query: str, stop: frozenset) -> str:
    """The query less its stop words, unless nothing else is left (BM25 ORs every term it gets)."""
    kept = [t for t in re.findall(r"\w+", query) if t.lower() not in stop]
    return " ".join(kept) if kept else query


class Retriever:
    """>>> Retriever(store, embedder).search("docs", "how to install", k=5)   # doctest: +SKIP"""

    def __init__(self, store: Store, embedder, reranker=None, candidates: int = 50, rrf_k: int = RRF_K,
                 weights: tuple[float, float] = (1.0, 1.0), field_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 stopwords: bool = False):
        self.store = store
        self.embedder = embedder
        self.reranker = reranker
        self.candidates = candidates  # per leg
        self.rrf_k = rrf_k
        self.weights = weights  # (dense, keyword) in the fusion
        self.field_weights = field_weights  # BM25 (text, heading, title)
        self.stop = _stopwords() if stopwords else frozenset()

    def search(self, collection: str, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.store.require(collection)
        n = max(self.candidates, k)
        rankings: list[list[str]] = []
        raw: dict[str, float] = {}
        if mode in ("hybrid", "dense"):
            vec = self.embedder.encode([query])[0]
            dense = self.store.dense(collection, vec, n)
            rankings.append([cid for cid, _ in dense])
            raw.update(dense)
        if mode in ("hybrid", "keyword"):
            kw = self.store.keyword(collection, _without(query, self.stop), n, self.field_weights)
            rankings.append([cid for cid, _ in kw])
            if mode == "keyword":
                raw.update(kw)
        if mode == "hybrid":
            scores = rrf(rankings, self.rrf_k, self.weights)
            # Equal fused scores happen whenever each ranker has a different #1; the lexical
            # match wins the tie, since an exact term is the thing dense search blurs.
            lexical = {cid: i for i, cid in enumerate(rankings[1])}
            ranked = sorted(scores, key=lambda c: (-scores[c], lexical.get(c, len(lexical))))
        else:
            scores = raw
            ranked = sorted(scores, key=lambda c: scores[c], reverse=True)
        # Ids Chroma knows but the catalogue does not (an ingest killed before its commit)
        # are dropped here: the catalogue is the source of truth. Copies of a passage score
        # alike and sit together in the ranking; all candidates are read so each hit names
        # every place its passage was found.
        rows = self.store.chunks(collection, ranked)
        hits = collapse([Hit(r.path, r.page, r.heading, r.start, r.end, r.text, scores[cid], cid)
                         for cid in ranked if (r := rows.get(cid)) is not None])
        if self.reranker and hits:
            pool = hits[: max(k * 4, 20)]
            new = self.reranker.scores(query, [h.text for h in pool])
            hits = [replace(h, score=s) for s, h in sorted(zip(new, pool), key=lambda p: p[0], reverse=True)]
        return hits[:k]

"""Hybrid retrieval: dense (Chroma) and keyword (SQLite FTS5 BM25), fused by their scores.

The default fusion ("score") turns each leg's scores over all the candidates into z-scores and
adds them with weights 0.6 (dense) and 0.4 (keyword); see `zfuse` for a candidate one leg did
not return. Unlike reciprocal-rank fusion it keeps how far ahead a leg's best is: a
query naming a rare exact term puts one passage far above the rest in BM25, and that margin
survives even when the dense leg ranks look-alike passages first. A keyword candidate that
Chroma's HNSW search did not return gets its exact cosine from its stored vector (never less
than the leg's last score): HNSW is approximate, and among the 10k load test's near-duplicate
documents it passed over planted needles whose cosine was the best of all (0.81 against its
own top 0.65). bench/bench_retrieval.py measured the fusion on two tuning sets (license,
nodeapi) and a held-out one (docs/benchmarks.md, sessions 14-15).

RRF (Cormack, Clarke & Buettcher, SIGIR 2009; score(d) = sum over rankings of 1 / (K + rank))
stays as fusion="rrf", K = 10, equal weights: the session 9 defaults. No stopword list;
50 candidates per leg.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, replace

from .store import Store
from .window import widen

RRF_K = 10
MODES = ("hybrid", "dense", "keyword")
FUSIONS = ("score", "rrf")
SCORE_WEIGHTS = (0.6, 0.4)  # (dense, keyword) z-scores: bench_retrieval --grid, session 14
# A hit is shown with up to WINDOW chunks either side while it spans at most WINDOW_CHARS
# (rag/window.py; bench_retrieval --windows and --window-chars on the two tuning sets, session 16).
WINDOW, WINDOW_CHARS = 3, 2000


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
    """
    >>> rrf([["a", "b"], ["b", "c"]], k=60)["b"] == 1/62 + 1/61
    True
    """
    scores: dict[str, float] = {}
    for i, ranking in enumerate(rankings):
        w = weights[i] if weights else 1.0
        for rank, cid in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + w / (k + rank)
    return scores


def zfuse(legs: list[list[tuple[str, float]]], weights=SCORE_WEIGHTS, floors=None) -> dict[str, float]:
    """Weighted sum of each leg's z-scores over every candidate of any leg.

    A candidate a leg did not return takes that leg's `floors[i]` (default: the leg's lowest
    score): the keyword leg passes 0 when it returned fewer than it was asked for, since every
    passage it left out matches no query term, and that is what keeps a lone exact match far
    ahead. A leg whose values are all equal adds nothing.

    >>> s = zfuse([[("a", 0.9), ("b", 0.85), ("c", 0.5)], [("b", 12.0)]], (0.5, 0.5), floors=(None, 0.0))
    >>> max(s, key=s.get)
    'b'
    """
    ids = list(dict.fromkeys(cid for leg in legs for cid, _ in leg))
    total = dict.fromkeys(ids, 0.0)
    for i, (leg, w) in enumerate(zip(legs, weights)):
        if not leg:
            continue
        got = dict(leg)
        floor = floors[i] if floors and floors[i] is not None else min(got.values())
        vals = [got.get(cid, floor) for cid in ids]
        mean = sum(vals) / len(vals)
        sd = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        if sd > 0:
            for cid, v in zip(ids, vals):
                total[cid] += w * (v - mean) / sd
    return total


def exact_cosines(query, stored: list[tuple[str, list[float]]]) -> list[tuple[str, float]]:
    """(id, cosine similarity to `query`) for each (id, vector)."""
    if not stored:
        return []
    import numpy as np

    rows, q = np.asarray([v for _, v in stored], dtype=np.float64), np.asarray(query, dtype=np.float64)
    cos = rows @ q / np.maximum(np.linalg.norm(rows, axis=1) * np.linalg.norm(q), 1e-12)
    return [(cid, float(c)) for (cid, _), c in zip(stored, cos)]


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
                 weights: tuple[float, float] | None = None,
                 field_weights: tuple[float, float, float] = (1.0, 1.0, 1.0), stopwords: bool = False,
                 fusion: str = "score", window: int = WINDOW, window_chars: int = WINDOW_CHARS):
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}")
        self.store = store
        self.embedder = embedder
        self.reranker = reranker
        self.candidates = candidates  # per leg
        self.rrf_k = rrf_k
        self.fusion = fusion
        # (dense, keyword) in the fusion
        self.weights = weights or (SCORE_WEIGHTS if fusion == "score" else (1.0, 1.0))
        self.field_weights = field_weights  # BM25 (text, heading, title)
        self.stop = _stopwords() if stopwords else frozenset()
        self.window = window
        self.window_chars = window_chars

    def search(self, collection: str, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.store.require(collection)
        n = max(self.candidates, k)
        legs: list[list[tuple[str, float]]] = []
        terms = _without(query, self.stop)
        kw = [] if mode == "dense" else self.store.keyword(collection, terms, n, self.field_weights)
        if mode in ("hybrid", "dense"):
            vec = self.embedder.encode([query])[0]
            legs.append(self.store.dense(collection, vec, n))
            if mode == "hybrid" and self.fusion == "score":
                # Keyword candidates HNSW passed over: their exact cosine, never below the leg's
                # last score (a passage outside its top n counts as the n-th, so a lone exact
                # keyword match keeps its lead), unless it is truly closer.
                seen, low = {cid for cid, _ in legs[0]}, min((d for _, d in legs[0]), default=-1.0)
                legs[0] += [(c, max(d, low)) for c, d in
                            exact_cosines(vec, self.store.vectors(collection, [c for c, _ in kw if c not in seen]))]
        if mode in ("hybrid", "keyword"):
            legs.append(kw)
        if mode == "hybrid":
            if self.fusion == "rrf":
                scores = rrf([[cid for cid, _ in leg] for leg in legs], self.rrf_k, self.weights)
            else:
                scores = zfuse(legs, self.weights, floors=(None, 0.0 if len(legs[1]) < n else None))
            # Equal fused scores (under RRF, whenever each leg has a different #1): the lexical
            # match wins the tie, since an exact term is the thing dense search blurs.
            lexical = {cid: i for i, (cid, _) in enumerate(legs[1])}
            ranked = sorted(scores, key=lambda c: (-scores[c], lexical.get(c, len(lexical))))
        else:
            scores = dict(legs[0])
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
        return widen(self.store, collection, hits, self.window, k, self.window_chars, key=passage_key)

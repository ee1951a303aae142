"""Retrieval: quality (recall@5, MRR) of dense, keyword and hybrid, and latency at 10k chunks.

Quality: the license texts in /usr/share/common-licenses ingested for real, and 30
hand-written questions (bench/data/license_qa.json), each with the files that answer it
and a phrase the answering passage contains. A hit is relevant when it comes from one
of those files and contains the phrase.

Latency: a store of N chunks (default 10,000) of real text from /usr/share/doc, with
random unit vectors standing in for embeddings (embedding 10k chunks on 2 cores would
take ~6 minutes and does not change the query path). Timed end to end per query:
the query embedding, Chroma HNSW, FTS5 BM25, fusion and the catalogue join; beside
it the anchor: the same query embedding plus one raw Chroma `query` call.

    python bench/bench_retrieval.py [--chunks 10000] [--queries 200]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rag.chunking import Chunk
from rag.embed import Embedder
from rag.ingest import Ingestor
from rag.retrieve import Retriever
from rag.store import FileRecord, Store

QA = Path(__file__).parent / "data" / "license_qa.json"


def quality(emb, tmp: Path) -> None:
    qa = json.loads(QA.read_text())
    with Store(tmp / "quality") as store:
        s = Ingestor(store, lambda: emb, embedder_name="all-MiniLM-L6-v2").run(["/usr/share/common-licenses"], "lic")
        print(f"quality corpus: {len(s.ingested)} files, {s.chunks} chunks; {len(qa)} questions")
        r = Retriever(store, emb)
        for mode in ("dense", "keyword", "hybrid"):
            recall, rr = 0, 0.0
            for item in qa:
                hits = r.search("lic", item["q"], k=10, mode=mode)
                ranks = [i for i, h in enumerate(hits, 1)
                         if Path(h.source).name in item["files"] and item["phrase"] in h.text]
                recall += bool(ranks and ranks[0] <= 5)
                rr += 1.0 / ranks[0] if ranks else 0.0
            print(f"  {mode:8s} recall@5 {recall / len(qa):.3f}   MRR@10 {rr / len(qa):.3f}")


def latency(emb, tmp: Path, n_chunks: int, n_queries: int) -> None:
    words: list[str] = []
    for f in sorted(Path("/usr/share/doc").rglob("*")):
        if f.suffix in (".md", ".txt", ".html", "") and f.is_file() and not f.is_symlink():
            try:
                words += f.read_text(errors="replace").split()
            except OSError:
                continue
        if len(words) > n_chunks * 150:
            break
    rng = np.random.default_rng(0)
    with Store(tmp / "latency") as store:
        store.create_collection("big", "all-MiniLM-L6-v2", emb.dimension, 200, 32)
        per_file = 100
        for fno in range(0, n_chunks, per_file):
            chunks = []
            for i in range(per_file):
                j = (fno + i) * 150 % max(1, len(words) - 150)
                text = " ".join(words[j:j + 150])
                chunks.append(Chunk(i, 0, len(text), text))
            v = rng.standard_normal((per_file, emb.dimension)).astype("float32")
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            rec = FileRecord(f"/synthetic/{fno // per_file}.txt", f"{fno:064d}", 0, 0, "ok", None, per_file)
            store.write_files("big", [(rec, chunks, v.tolist())])
        print(f"latency store: {store.collection('big').chunks} chunks")
        r = Retriever(store, emb)
        vocab = [w for w in words[:50000] if w.isalpha() and len(w) > 4]
        queries = [" ".join(random.Random(i).sample(vocab, 4)) for i in range(n_queries)]
        col = store._vectors("big")
        for q in queries[:10]:  # warm up both paths
            r.search("big", q, k=5)
        ours, raw = [], []
        for q in queries:
            t = time.perf_counter()
            r.search("big", q, k=5)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            col.query(query_embeddings=[emb.encode([q])[0].tolist()], n_results=5)
            raw.append(time.perf_counter() - t)
        p = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] * 1000  # noqa: E731
        print(f"  hybrid search   p50 {p(ours, 50):.1f} ms  p95 {p(ours, 95):.1f} ms")
        print(f"  encode + raw Chroma query (anchor)  p50 {p(raw, 50):.1f} ms  p95 {p(raw, 95):.1f} ms")
        print(f"  ratio p50 hybrid/anchor {p(ours, 50) / p(raw, 50):.2f} (goal: hybrid p50 <= 50 ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    emb = Embedder(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quality:
            quality(emb, Path(tmp))
        latency(emb, Path(tmp), args.chunks, args.queries)


if __name__ == "__main__":
    main()

"""Retrieval: quality (recall@5, MRR@10) on two question sets, and latency at 10k chunks.

Quality, two collections ingested for real with the bundled MiniLM embedder:

- ``license`` (the tuning set): the license texts in /usr/share/common-licenses and 30
  hand-written questions (bench/data/license_qa.json);
- ``nodeapi`` (the second tuning set, session 14): 20 Markdown pages of the Node.js API docs in
  /usr/share/doc/nodejs/api and 40 questions (bench/data/nodeapi_qa.json), written by a helper
  who never saw a search result; headings, code and prose, unlike the other two;
- ``pyref`` (held out: written without looking at any result, never tuned on): the
  Python language reference topics that ship with CPython (``pydoc_data.topics``), one
  file per topic, and 40 questions (bench/data/pyref_qa.json).

Each question lists the files that answer it and a phrase the answering passage contains;
a hit is relevant when one of its files is listed and its text holds the phrase (spaces
collapsed). Beside crofter's modes stands the anchor: the naive baseline of 1000-character
chunks embedded with the same model, dense search only.

``--reranker FOLDER`` reorders each search's candidates with a local sentence-transformers
CrossEncoder folder (crofter's `reranker` setting), in the quality runs and in the latency run;
with ``--reranker-backends torch,openvino`` the latency run times the reranked search on each
backend side by side (torch, sentence-transformers itself, is the anchor) and prints the ratio.
``--windows 0,1,2`` measures hits shown with that many neighbouring chunks either side
(rag/window.py), printing how long the hits then are beside the anchor's 1000 characters.
``--variants`` re-ingests with each chunk context (what a chunk is embedded with: nothing,
heading path, title, ...); ``--grid`` ingests once and sweeps the fusion (RRF k, depth per
leg, leg weights, BM25 heading and title weights).

Latency: a store of N chunks (default 10,000) of real text from /usr/share/doc, with random
unit vectors standing in for embeddings (the query path is the same). Timed end to end per
query, beside the anchor: the same query embedding plus one raw Chroma ``query`` call.

    python bench/bench_retrieval.py [--sets license,nodeapi,pyref] [--variants] [--grid]
                                    [--backend torch|torch-bf16|openvino|onnx|onnx-int8|auto] [--reranker FOLDER]
                                    [--reranker-backends torch,openvino] [--chunks 10000] [--skip-latency]
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rag.chunking import CONTEXTS, DEFAULT_CONTEXT, DEFAULT_SIZE, Chunk  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.rerank import Reranker  # noqa: E402
from rag.ingest import Ingestor, walk  # noqa: E402
from rag.loaders import extract  # noqa: E402
from rag.retrieve import WINDOW, WINDOW_CHARS, Retriever  # noqa: E402
from rag.store import FileRecord, Store  # noqa: E402

DATA = Path(__file__).parent / "data"
OPTS: dict = {}
SETS = {"license": DATA / "license_qa.json", "pyref": DATA / "pyref_qa.json", "nodeapi": DATA / "nodeapi_qa.json"}
NODE_API = Path("/usr/share/doc/nodejs/api")
NODE_FILES = ("path timers console os events child_process url readline worker_threads cluster modules esm "
              "packages globals querystring string_decoder dns net assert repl").split()


def corpus(name: str, tmp: Path) -> Path:
    if name == "license":
        return Path("/usr/share/common-licenses")
    if name == "nodeapi":
        folder = tmp / "nodeapi"
        folder.mkdir(exist_ok=True)
        for stem in NODE_FILES:
            (folder / f"{stem}.md").write_bytes((NODE_API / f"{stem}.md").read_bytes())
        return folder
    import pydoc_data.topics

    folder = tmp / "pyref"
    folder.mkdir(exist_ok=True)
    for topic, text in pydoc_data.topics.topics.items():
        (folder / f"{topic}.txt").write_text(text)
    return folder


def _norm(s: str) -> str:
    return " ".join(s.split())


def score(qa: list[dict], search) -> tuple[float, float]:
    """(recall@5, MRR@10) of `search(question) -> [(files, text)]`."""
    recall, rr = 0, 0.0
    for item in qa:
        phrase = _norm(item["phrase"])
        ranks = [i for i, (files, text) in enumerate(search(item["q"])[:10], 1)
                 if any(Path(f).name in item["files"] for f in files) and phrase in _norm(text)]
        recall += bool(ranks and ranks[0] <= 5)
        rr += 1.0 / ranks[0] if ranks else 0.0
    return recall / len(qa), rr / len(qa)


def naive(emb, folder: Path, qa: list[dict]) -> tuple[float, float]:
    """The anchor: 1000-character chunks, dense only (cosine over all of them)."""
    files, _, _ = walk([folder])
    chunks = []
    for f in files:
        text = extract(f).text
        chunks += [(str(f), text[i:i + 1000]) for i in range(0, len(text), 1000) if text[i:i + 1000].strip()]
    vecs = emb.encode([t for _, t in chunks])

    def search(q):
        sims = vecs @ emb.encode([q])[0]
        return [([chunks[i][0]], chunks[i][1]) for i in np.argsort(-sims)[:10]]

    return score(qa, search)


def modes(r: Retriever, qa: list[dict], collection: str) -> dict[str, tuple[float, float]]:
    return {mode: score(qa, lambda q: [(h.sources(), h.text) for h in r.search(collection, q, k=10, mode=mode)])
            for mode in ("dense", "keyword", "hybrid")}


def line(label: str, rec: float, mrr: float) -> str:
    return f"  {label:34s} recall@5 {rec:.3f}   MRR@10 {mrr:.3f}"


def quality(emb, tmp: Path, sets: list[str], contexts: list[str], grid: bool, out: dict) -> None:
    for name in sets:
        qa = json.loads(SETS[name].read_text())
        folder = corpus(name, tmp)
        rec, mrr = naive(emb, folder, qa)
        print(f"[{name}] {len(qa)} questions")
        print(line("anchor: 1000-char chunks, dense", rec, mrr))
        out.setdefault(name, {})["anchor"] = [rec, mrr]
        for ctx in contexts:
            with Store(tmp / f"q-{name}-{ctx}") as store:
                t = time.perf_counter()
                s = Ingestor(store, lambda: emb, embedder_name="all-MiniLM-L6-v2", context=ctx,
                             chunk_size=OPTS["chunk_size"], chunk_overlap=OPTS["chunk_size"] * 3 // 16).run([folder], "c")
                dt = time.perf_counter() - t
                print(f"  context {ctx}: {len(s.ingested)} files, {s.chunks} chunks, {s.chunks / dt:.0f} chunks/s")
                for w, wc in itertools.product(OPTS["windows"], OPTS["window_chars"]):
                    r = Retriever(store, emb, reranker=OPTS["reranker"], stopwords=OPTS["stopwords"], window=w,
                                  window_chars=wc)
                    shown = [len(h.text) for item in qa[:10] for h in r.search("c", item["q"], k=5)]
                    print(f"  window {w}, up to {wc} chars: hits of {statistics.mean(shown):.0f} chars on average "
                          "(the anchor's: 1000)")
                    for mode, (rec, mrr) in modes(r, qa, "c").items():
                        print(line(f"{mode} ({ctx}, w{w}, c{wc})", rec, mrr))
                        out[name][f"{mode}/{ctx}/w{w}/c{wc}"] = [rec, mrr]
                if grid and ctx == contexts[0]:
                    sweep(store, emb, qa, out[name])


def sweep(store: Store, emb, qa: list[dict], out: dict) -> None:
    settings = [dict(fusion="rrf", rrf_k=k, weights=(1.0, wk), candidates=depth, field_weights=(1.0, wh, wt))
                for k, depth, wk, wh, wt in itertools.product((10, 30, 60), (20, 50, 100), (0.5, 1.0, 1.5),
                                                               (1.0, 3.0), (0.0, 1.0, 3.0))]
    settings += [dict(fusion="score", weights=(a, round(1 - a, 2)), candidates=depth, field_weights=(1.0, wh, wt))
                 for a, depth, wh, wt in itertools.product((0.4, 0.5, 0.6, 0.7, 0.8), (20, 50, 100), (1.0, 3.0),
                                                           (0.0, 1.0, 3.0))]
    rows = []
    for kw in settings:
        r = Retriever(store, emb, stopwords=OPTS["stopwords"], **kw)
        rec, mrr = score(qa, lambda q: [(h.sources(), h.text) for h in r.search("c", q, k=10)])
        rows.append((rec, mrr, " ".join(f"{k}={v}" for k, v in kw.items())))
    rows.sort(key=lambda x: (-x[0], -x[1]))
    print("  fusion sweep (best 8 of %d):" % len(rows))
    for rec, mrr, label in rows[:8]:
        print(line(label, rec, mrr))
    out["sweep"] = [[rec, mrr, label] for rec, mrr, label in rows]


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
        vocab = [w for w in words[:50000] if w.isalpha() and len(w) > 4]
        queries = [" ".join(random.Random(i).sample(vocab, 4)) for i in range(n_queries)]
        col = store._vectors("big")
        p = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] * 1000  # noqa: E731
        reranked = {}
        for label, rer in [("", OPTS.get("reranker"))] + OPTS["rerankers"]:
            r = Retriever(store, emb, reranker=rer)
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
            if label:  # the reranker on each backend, in the same run
                reranked[label] = p(ours, 50)
                label = f"{rer.backend}{f' (asked for {label}; {rer.fallback})' if rer.fallback else ''}"
                print(f"  hybrid search + reranker on {label}   p50 {p(ours, 50):.1f} ms  p95 {p(ours, 95):.1f} ms")
                continue
            print(f"  hybrid search   p50 {p(ours, 50):.1f} ms  p95 {p(ours, 95):.1f} ms")
            print(f"  encode + raw Chroma query (anchor)  p50 {p(raw, 50):.1f} ms  p95 {p(raw, 95):.1f} ms")
            print(f"  ratio p50 hybrid/anchor {p(ours, 50) / p(raw, 50):.2f} (goal: hybrid p50 <= 50 ms)")
        if "torch" in reranked:
            for label, ms in reranked.items():
                if label != "torch":
                    print(f"  reranked search p50, torch / {label}: {reranked['torch'] / ms:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="license,nodeapi,pyref",
                    help="comma-separated: license, nodeapi (tuning), pyref (held out)")
    ap.add_argument("--variants", action="store_true", help="every chunk context, not only the default")
    ap.add_argument("--grid", action="store_true", help="sweep the fusion settings on each set")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_SIZE)
    ap.add_argument("--stopwords", action="store_true", help="keyword leg leaves English function words out")
    ap.add_argument("--porter", action="store_true", help="measure a Porter-stemmed keyword index")
    ap.add_argument("--context", default=DEFAULT_CONTEXT, choices=CONTEXTS, help="chunk context without --variants")
    ap.add_argument("--backend", default=None, help="embedding backend (default: torch, float32, the reference; "
                    "crofter itself defaults to auto)")
    ap.add_argument("--reranker", metavar="FOLDER", help="a local CrossEncoder folder reordering the candidates")
    ap.add_argument("--reranker-backends", metavar="B1,B2",
                    help="with --reranker and --skip-quality: time the reranked search on each backend (torch, "
                    "openvino) side by side, instead of the reranker in every search")
    ap.add_argument("--windows", default=str(WINDOW), metavar="W1,W2",
                    help=f"neighbouring chunks a hit is shown with, each measured (default {WINDOW})")
    ap.add_argument("--window-chars", default=str(WINDOW_CHARS), metavar="C1,C2",
                    help=f"the most characters a widened hit may span (default {WINDOW_CHARS})")
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    args = ap.parse_args()
    if args.porter:
        import rag.store

        rag.store.MIGRATIONS = [(n, sql.replace('tokenize="unicode61', 'tokenize="porter unicode61'))
                                for n, sql in rag.store.MIGRATIONS]
    if args.reranker_backends and not (args.reranker and args.skip_quality):
        ap.error("--reranker-backends needs --reranker FOLDER and --skip-quality (it times the latency run only)")
    backends = args.reranker_backends.split(",") if args.reranker_backends else []
    kw = {"backend": args.backend} if args.backend else {}
    emb = Embedder(device="cpu", **kw)
    out: dict = {}
    contexts = list(CONTEXTS) if args.variants else [args.context]
    with tempfile.TemporaryDirectory() as tmp:
        OPTS.update(chunk_size=args.chunk_size, stopwords=args.stopwords,
                    reranker=Reranker(args.reranker, device="cpu") if args.reranker and not backends else None,
                    rerankers=[(b, Reranker(args.reranker, device="cpu", backend=b, cache=Path(tmp) / "rerank"))
                               for b in backends],
                    windows=[int(w) for w in args.windows.split(",")],
                    window_chars=[int(x) for x in args.window_chars.split(",")])
        if not args.skip_quality:
            quality(emb, Path(tmp), args.sets.split(","), contexts, args.grid, out)
        if not args.skip_latency:
            latency(emb, Path(tmp), args.chunks, args.queries)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

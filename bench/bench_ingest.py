"""Ingest throughput: `crofter ingest` end to end vs raw SentenceTransformer.encode of the same chunks.

One process, one loaded model: first the full pipeline (walk, hash, extract, chunk,
embed, write Chroma + SQLite) into a fresh store, then `model.encode` alone over exactly
the texts that pipeline embedded, at the same batch size. Prints chunks/s of both and
the ratio (goal: ingest / raw >= 0.9, i.e. everything but the embedder costs < 10%).

With ``--backends torch,torch-bf16,openvino`` each embedding backend (rag/embed.py: torch,
torch-bf16, openvino, onnx, onnx-int8, auto) ingests the same corpus in
turn (rounds interleaved), and its chunks/s is printed next to torch's (#17's goal: >= 2.0x
with recall within a point, which bench_retrieval.py --backend measures).

    python bench/bench_ingest.py [--mb 1.5] [--rounds 2] [--backends torch]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rag.chunking import Chunk  # noqa: E402
from rag.embed import BATCH_SIZE, Embedder  # noqa: E402
from rag.ingest import Ingestor  # noqa: E402
from rag.store import Store  # noqa: E402


def corpus(dst: Path, mb: float) -> int:
    """Real documents from the machine: the license texts, then Markdown/HTML/text from /usr/share/doc."""
    budget = int(mb * 1024 * 1024)
    files = sorted(Path("/usr/share/common-licenses").iterdir())
    for pattern in ("*.md", "*.html", "*.txt", "*.rst"):
        files += sorted(Path("/usr/share/doc").rglob(pattern))
    used = 0
    for i, f in enumerate(files):
        if not f.is_file() or f.is_symlink():
            continue
        size = f.stat().st_size
        if used + size > budget:
            continue
        shutil.copy(f, dst / f"{i:04d}-{f.name}")
        used += size
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1.5, help="corpus size in MB")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backends", default="torch", help="comma-separated: torch, torch-bf16, openvino, onnx, onnx-int8, auto")
    args = ap.parse_args()
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        embs = {b: Embedder(device="cpu", backend=b, cache=Path(tmp) / "onnx") for b in backends}
        for emb in embs.values():
            emb.encode(["warm up"] * 64)
        docs = Path(tmp) / "docs"
        docs.mkdir()
        size = corpus(docs, args.mb)
        print(f"corpus: {sum(1 for _ in docs.iterdir())} files, {size / 1e6:.2f} MB")
        ratios = []
        speed: dict[str, list[float]] = {b: [] for b in backends}
        for r, b in ((r, b) for r in range(args.rounds) for b in backends):
            emb = embs[b]
            root = Path(tmp) / f"rag{r}-{b}"
            with Store(root) as store:
                ing = Ingestor(store, lambda: emb, embedder_name="all-MiniLM-L6-v2")
                t = time.perf_counter()
                s = ing.run([docs], "bench")
                t_ingest = time.perf_counter() - t
                rows = store.chunks("bench", store.chunk_ids("bench"))
                texts = [Chunk(c.idx, c.start, c.end, c.text, c.heading, c.page, c.context).embedding_text()
                         for c in rows.values()]
            speed[b].append(s.chunks / t_ingest)
            if b != "torch":
                print(f"round {r + 1} {b}: {s.chunks} chunks | ingest {s.chunks / t_ingest:.1f} chunks/s ({t_ingest:.1f} s)")
                continue
            t = time.perf_counter()
            emb.model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)
            t_raw = time.perf_counter() - t
            ratio = (s.chunks / t_ingest) / (len(texts) / t_raw)
            ratios.append(ratio)
            print(f"round {r + 1} torch: {s.chunks} chunks, {len(s.failed)} failed | ingest {s.chunks / t_ingest:.1f} chunks/s "
                  f"({t_ingest:.1f} s) | raw encode {len(texts) / t_raw:.1f} chunks/s ({t_raw:.1f} s) | ratio {ratio:.3f}")
        if ratios:
            print(f"ratio ingest/raw: mean {sum(ratios) / len(ratios):.3f} (goal >= 0.9)")
        base = sum(speed["torch"]) / len(speed["torch"]) if speed.get("torch") else None
        for b, xs in speed.items():
            mean = sum(xs) / len(xs)
            print(f"{b}: mean {mean:.1f} chunks/s" + (f", {mean / base:.2f}x torch (goal >= 2.0)" if base and b != "torch" else ""))


if __name__ == "__main__":
    main()

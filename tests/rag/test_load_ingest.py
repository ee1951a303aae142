"""L2: many documents in one collection: ingest completes, memory plateaus, planted needles are found,
and the ingest resumes after a kill without duplicates.

The documents are sentences of the machine's license texts, shuffled with a fixed seed (one
sentence each, so that embedding 500 of them stays quick on 2 cores). A needle is a
sentence with an invented word planted in one seeded document; its query asks about that word
in other words. The fast tier ingests 500 documents; `-m slow` ingests 10,000 and kills a CLI
ingest at a seeded point first. Figures (RSS samples, times) are printed (-s)."""
from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rag.ingest
from rag.ingest import Ingestor
from rag.retrieve import Retriever
from rag.store import Store

from .conftest import LICENSES, consistent

ROOT = Path(__file__).resolve().parents[2]
PLATEAU = 1.2  # last-quarter RSS max / first-quarter RSS max
RECALL = 0.95
SYLLABLES = ["qua", "vor", "zel", "mir", "tox", "bren", "ul", "kash", "dre", "pim", "sov", "yth"]


def sentences() -> list[str]:
    text = " ".join(f.read_text(errors="replace") for f in sorted(LICENSES.iterdir()) if f.is_file())
    found = {s.strip() for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", text))}
    return sorted(s for s in found if 40 <= len(s) <= 160)


def build(folder: Path, n_docs: int, n_needles: int, seed: int) -> dict[str, str]:
    """Write n_docs documents in folders of 500; return {query: path of the needle's document}."""
    rng = random.Random(seed)
    pool = sentences()
    needles: dict[int, tuple[str, str]] = {}
    names: set[str] = set()
    while len(needles) < n_needles:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        doc = rng.randrange(n_docs)
        if name in names or doc in needles:
            continue
        names.add(name)
        code = rng.randrange(1000, 9999)
        needles[doc] = (f"The archive of {name} keeps its ledgers under vault code {code}.",
                        f"Which vault code guards the {name} archive ledgers?")
    out = {}
    for i in range(n_docs):
        d = folder / f"part{i // 500:03d}"
        d.mkdir(parents=True, exist_ok=True)
        body = rng.choice(pool)
        if i in needles:
            body = f"{body} {needles[i][0]}"
            out[needles[i][1]] = str(d / f"doc{i:05d}.txt")
        (d / f"doc{i:05d}.txt").write_text(body + "\n")
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ingest_sampled(ingestor: Ingestor, folder: Path, every: int):
    """Run an ingest, sampling this process's RSS every `every` files once the first group is
    committed (before that, Chroma's index and torch's buffers are still being set up);
    (summary, samples, CPU seconds)."""
    samples: list[float] = []
    marks: list[int] = []

    def tick(p):
        if p.chunks and p.files_done // every > len(marks):
            marks.append(p.files_done)
            samples.append(rss_mb())

    cpu = time.process_time()
    summary = ingestor.run([folder], "load", on_progress=tick)
    return summary, samples, time.process_time() - cpu


def check_plateau(samples: list[float]) -> None:
    q = max(1, len(samples) // 4)
    first, last = max(samples[:q]), max(samples[-q:])
    print(f"L2 RSS samples ({len(samples)}): first-quarter max {first:.0f} MB, last-quarter max {last:.0f} MB, "
          f"ratio {last / first:.3f}")
    assert last <= PLATEAU * first


def check_needles(store: Store, embedder, needles: dict[str, str]) -> None:
    r = Retriever(store, embedder)
    found = sum(1 for q, path in needles.items() if path in {h.source for h in r.search("load", q, k=5)})
    print(f"L2 needles: {found}/{len(needles)} in the top 5")
    assert found / len(needles) >= RECALL


@pytest.mark.parametrize("backend", ["torch", "openvino"])  # the reference, and auto's choice on a CPU
def test_500_documents_complete_plateau_find_needles_and_reingest_as_noop(tmp_path, store, embedder, monkeypatch,
                                                                          backend):
    from rag.embed import Embedder

    if backend != "torch":
        embedder = Embedder(device="cpu", backend=backend, cache=tmp_path / "onnx")
    docs = tmp_path / "docs"
    needles = build(docs, 500, 5, seed=2)
    ing = Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2")
    monkeypatch.setattr(rag.ingest, "GROUP_CHUNKS", 25)  # 20 commit groups to sample between
    t = time.monotonic()
    s, samples, cpu = ingest_sampled(ing, docs, every=20)
    print(f"L2 500 documents: {time.monotonic() - t:.1f} s wall, {cpu:.1f} s CPU, {s.chunks} chunks")
    assert len(s.ingested) == 500 and not s.failed
    info = store.collection("load")
    assert (info.files, info.chunks) == (500, s.chunks)
    consistent(store, "load")
    check_plateau(samples)
    check_needles(store, embedder, needles)
    again = ing.run([docs], "load")
    assert again.ingested == [] and len(again.unchanged) == 500
    assert store.collection("load").chunks == s.chunks


def _count_files(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
        try:
            return con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11])
def test_10k_documents_killed_resumed_plateau_and_needles(seed, tmp_path, crofter_home, embedder):
    docs = tmp_path / "docs"
    needles = build(docs, 10_000, 20, seed=seed)
    kill_after = random.Random(seed).randint(2_000, 6_000)  # committed files when the kill comes
    env = {**os.environ, "CROFTER_HOME": str(crofter_home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "app.cli", "ingest", str(docs), "-c", "load", "--json"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = crofter_home / "rag" / "catalog.sqlite3"
    deadline = time.monotonic() + 3600
    while _count_files(db) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "ingest ended before the kill: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _count_files(db)
    print(f"L2 killed at {committed} committed files (aimed at {kill_after})")
    assert kill_after <= committed < 10_000

    with Store(crofter_home / "rag") as s:
        ids = s.chunk_ids("load")
        assert len(ids) == len(set(ids))
        ing = Ingestor(s, lambda: embedder, embedder_name=s.collection("load").embedder)
        t = time.monotonic()
        resumed, samples, cpu = ingest_sampled(ing, docs, every=100)
        print(f"L2 resume of {len(resumed.ingested)} documents: {time.monotonic() - t:.1f} s wall, {cpu:.1f} s CPU")
        assert len(resumed.unchanged) == committed and len(resumed.ingested) == 10_000 - committed
        assert s.collection("load").files == 10_000
        consistent(s, "load")
        check_plateau(samples)
        check_needles(s, embedder, needles)
        again = ing.run([docs], "load")
        assert again.ingested == [] and len(again.unchanged) == 10_000


def test_the_heap_is_trimmed_after_every_commit_group(tmp_path, store, embedder, monkeypatch):
    """glibc keeps the blocks freed by each new batch shape; the ingest hands them back after
    each group it commits, so a long ingest's memory stays flat (the L2 rows above)."""
    import platform

    from rag.embed import release_heap

    if platform.libc_ver()[0] == "glibc":
        assert release_heap() is True
    calls = []
    monkeypatch.setattr(rag.ingest, "release_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(rag.ingest, "GROUP_CHUNKS", 10)
    docs = tmp_path / "docs"
    build(docs, 40, 1, seed=3)
    s = Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([docs], "load")
    assert len(s.ingested) == 40 and len(calls) == 4  # 40 one-chunk files, groups of 10

"""Ingest: real documents, no-op re-ingest, change and delete noticed, failures reported, crash safety, one owner."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag.ingest import Ingestor
from rag.store import RagError, Store, StoreLocked

from .conftest import LICENSES, consistent

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_then_reingest_is_a_noop(store, ingestor, licenses, embedder):
    first = ingestor.run([licenses], "lic")
    assert len(first.ingested) == 4 and not first.failed
    assert first.chunks == store.collection("lic").chunks > 0
    consistent(store, "lic")

    loads = []
    again = Ingestor(store, lambda: loads.append(1) or embedder, embedder_name="all-MiniLM-L6-v2")
    second = again.run([licenses], "lic")
    assert second.ingested == [] and len(second.unchanged) == 4
    assert loads == [], "an unchanged folder must not even load the embedder"
    # Touching a file without changing it: the hash decides, nothing is re-embedded.
    os.utime(licenses / "BSD", ns=(time.time_ns(), time.time_ns()))
    third = again.run([licenses], "lic")
    assert third.ingested == [] and str(licenses / "BSD") in third.unchanged


def test_changed_and_deleted_files_are_noticed(store, ingestor, licenses):
    ingestor.run([licenses], "lic")
    bsd = str(licenses / "BSD")
    old_ids = set(store.chunk_ids("lic"))
    (licenses / "BSD").write_text("A brand new text about the zorblaxian treaty.\n")
    (licenses / "CC0-1.0").unlink()
    s = ingestor.run([licenses], "lic")
    assert s.ingested == [bsd]
    assert s.removed == [str(licenses / "CC0-1.0")]
    consistent(store, "lic")
    assert store.file("lic", str(licenses / "CC0-1.0")) is None
    texts = [c.text for c in store.chunks("lic", store.chunk_ids("lic")).values() if c.path == bsd]
    assert texts == ["A brand new text about the zorblaxian treaty."]
    assert old_ids - set(store.chunk_ids("lic")), "the old BSD chunks must be gone"


def test_a_folder_with_nothing_left_keeps_its_files(store, ingestor, licenses):
    """Every file of a named folder gone at once (an empty mount point: a disk not plugged in)
    drops nothing and says why; once one file is back, the others count as deleted."""
    from rag.ingest import stored_under

    first = ingestor.run([licenses], "lic")
    hidden = {p: p.read_bytes() for p in licenses.iterdir()}
    for p in hidden:
        p.unlink()
    s = ingestor.run([licenses], "lic")
    assert not s.removed and not s.ingested
    assert s.failed == [(str(licenses), "no files left in the folder; the 4 file(s) stored from it stay in the "
                         "collection (`crofter collections forget lic PATH` drops them)")]
    assert store.collection("lic").chunks == first.chunks
    consistent(store, "lic")
    (licenses / "BSD").write_bytes(hidden[licenses / "BSD"])
    s = ingestor.run([licenses], "lic")
    assert s.unchanged == [str(licenses / "BSD")] and not s.failed
    assert sorted(s.removed) == sorted(str(p) for p in hidden if p.name != "BSD")
    assert stored_under(store, "lic", licenses) == [str(licenses / "BSD")]
    consistent(store, "lic")


def test_failures_are_reported_and_the_batch_goes_on(store, ingestor, licenses, tmp_path):
    (licenses / "binary.txt").write_bytes(b"\x00\x01\x02garbage" * 50)
    (licenses / "broken.pdf").write_bytes(b"%PDF-1.7\nthis is no pdf")
    os.mkfifo(licenses / "fifo.md")
    os.symlink("/dev/zero", licenses / "zero.txt")
    ingestor.max_bytes = 12_000
    s = ingestor.run([licenses, tmp_path / "does-not-exist"], "lic")
    reasons = {os.path.basename(p): r for p, r in s.failed}
    assert "binary" in reasons["binary.txt"]
    assert "PDF" in reasons["broken.pdf"]
    assert "not a regular file" in reasons["fifo.md"]
    assert "not a regular file" in reasons["zero.txt"]
    assert "size cap" in reasons["MPL-2.0"]  # 16.7 kB > 12 kB
    assert "no such file" in reasons["does-not-exist"]
    assert sorted(os.path.basename(p) for p in s.ingested) == ["Apache-2.0", "BSD", "CC0-1.0"]
    info = store.collection("lic")
    assert info.files == 3 and info.failed == 5
    consistent(store, "lic")


def test_second_owner_gets_a_clear_message(tmp_path, store):
    with pytest.raises(StoreLocked, match=r"in use by another crofter process \(pid %d\)" % os.getpid()):
        Store(store.root)
    store.close()
    Store(store.root).close()  # free again once the owner closed it


def test_collection_names_and_embedder_mismatch(store, ingestor, licenses):
    with pytest.raises(RagError, match="collection name"):
        ingestor.run([licenses], "../escape")
    ingestor.run([licenses / "BSD"], "lic")
    other = Ingestor(store, lambda: None, embedder_name="/some/other/model")
    with pytest.raises(RagError, match="built with embedder all-MiniLM-L6-v2"):
        other.run([licenses / "Apache-2.0"], "lic")


# F2: the CLI's ingest in a real subprocess, SIGKILLed by itself at a seeded point. The child
# wraps the store's Chroma collection and SQLite connection (no behaviour change) to count
# events; at the chosen one it sends itself SIGKILL, so nothing is cleaned up or flushed.
# Events, per commit group: "delete" (old vectors dropped), "add" (new vectors written),
# "commit" (just before the catalogue COMMIT), "committed" (just after it, and logged).
_KILL_CHILD = r"""
import json, os, signal, sys
event, nth, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import rag.ingest
import rag.store as st
rag.ingest.GROUP_CHUNKS = 8  # many small commit groups, so a kill lands between and inside them
seen = {}

def hit(name):
    seen[name] = seen.get(name, 0) + 1
    if name == event and seen[name] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

class Vectors:
    def __init__(self, col): self._col = col
    def __getattr__(self, name): return getattr(self._col, name)
    def delete(self, **kw): out = self._col.delete(**kw); hit("delete"); return out
    def add(self, **kw): out = self._col.add(**kw); hit("add"); return out

class Db:
    def __init__(self, db): self._db, self._paths = db, []
    def __getattr__(self, name): return getattr(self._db, name)
    def executemany(self, *a): return self._db.executemany(*a)
    def execute(self, sql, *a):
        if sql == "COMMIT" and self._paths:
            hit("commit")
        out = self._db.execute(sql, *a)
        if sql.startswith("INSERT OR REPLACE INTO files"):
            self._paths.append(a[0][1])
        elif sql == "COMMIT" and self._paths:
            with open(log, "a") as fh:
                fh.write("".join(p + "\n" for p in self._paths)); fh.flush(); os.fsync(fh.fileno())
            self._paths = []
            hit("committed")
        elif sql == "ROLLBACK":
            self._paths = []
        return out

init, vectors = st.Store.__init__, st.Store._vectors
def patched_init(self, *a, **kw):
    init(self, *a, **kw)
    self.db = Db(self.db)
st.Store.__init__ = patched_init
st.Store._vectors = lambda self, name: Vectors(vectors(self, name))
from app.cli import main
sys.exit(main(sys.argv[4:]))
"""
KILL_EVENTS = ("delete", "add", "commit", "committed")
N_DOCS = 32
FAST_SEEDS = (1, 2, 5)  # add #5, delete #1, commit #3; the slow tier runs 20 more


def kill_point(seed: int) -> tuple[str, int]:
    """(event, occurrence): the corpus below makes at least 6 commit groups, so 1..5 always occurs."""
    rng = random.Random(seed)
    return rng.choice(KILL_EVENTS), rng.randint(1, 5)


@pytest.fixture(scope="module")
def f2_docs(tmp_path_factory):
    """N_DOCS short documents cut from the machine's license texts, shuffled with a fixed seed."""
    paras = [p.strip() for f in sorted(LICENSES.iterdir()) if f.is_file()
             for p in f.read_text(errors="replace").split("\n\n") if 200 < len(p.strip()) < 600]
    random.Random(0).shuffle(paras)
    docs = tmp_path_factory.mktemp("f2") / "docs"
    docs.mkdir()
    for i in range(N_DOCS):
        (docs / f"doc{i:02d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paras[2 * i:2 * i + 2]) + "\n")
    return docs


@pytest.fixture(scope="module")
def f2_reference(f2_docs, embedder, tmp_path_factory):
    """Chunk ids and texts of an ingest nothing interrupted (ids depend on path, content and position)."""
    with Store(tmp_path_factory.mktemp("f2-ref")) as s:
        Ingestor(s, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([f2_docs], "lic")
        # The child's commit groups (>= 8 chunks each, files in walk order): 6 or more, so every
        # kill point (occurrence 1..5) happens with work still left to do.
        groups, pending = 0, 0
        for rec in s.files("lic"):
            pending += rec.n_chunks
            if pending >= 8:
                groups, pending = groups + 1, 0
        assert groups + (pending > 0) >= 6
        return {cid: c.text for cid, c in s.chunks("lic", s.chunk_ids("lic")).items()}


def kill_and_resume(seed: int, docs, reference, home, embedder) -> None:
    event, nth = kill_point(seed)
    log = home.parent / f"committed-{seed}.log"
    env = {**os.environ, "CROFTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", _KILL_CHILD, event, str(nth), str(log), "ingest", str(docs), "-c", "lic", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed} ({event} #{nth}) was not killed: {proc.stderr[-2000:]}"
    committed = log.read_text().splitlines() if log.exists() else []
    groups = nth if event == "committed" else nth - 1
    db = home / "rag" / "catalog.sqlite3"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with Store(home / "rag") as s:  # opens: the dead owner's lock went with it
        # Exactly the groups whose COMMIT returned are in the catalogue, nothing else.
        assert sorted(r.path for r in s.files("lic")) == sorted(committed)
        assert bool(committed) == (groups > 0)
        ids = s.chunk_ids("lic")
        assert len(ids) == len(set(ids)), "duplicate chunks after the kill"
        assert set(ids) <= set(s.vector_ids("lic")), "a committed chunk lost its vector"
        assert set(ids) <= set(reference)

        ing = Ingestor(s, lambda: embedder, embedder_name=s.collection("lic").embedder)
        resumed = ing.run([docs], "lic")
        assert sorted(resumed.unchanged) == sorted(committed) and not resumed.failed
        consistent(s, "lic")  # the orphan vectors of the killed group are gone too
        chunks = s.chunks("lic", s.chunk_ids("lic"))
        assert {cid: c.text for cid, c in chunks.items()} == reference
        again = ing.run([docs], "lic")
        assert again.ingested == [] and len(again.unchanged) == N_DOCS
        assert sorted(s.chunk_ids("lic")) == sorted(reference)


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_sigkill_mid_ingest_then_resume(seed, f2_docs, f2_reference, tmp_path, embedder):
    kill_and_resume(seed, f2_docs, f2_reference, tmp_path / "home", embedder)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [s for s in range(23) if s not in FAST_SEEDS])
def test_sigkill_mid_ingest_then_resume_many_seeds(seed, f2_docs, f2_reference, tmp_path, embedder):
    kill_and_resume(seed, f2_docs, f2_reference, tmp_path / "home", embedder)

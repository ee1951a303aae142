"""Ingest: real documents, no-op re-ingest, change and delete noticed, failures reported, crash safety, one owner."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from rag.ingest import Ingestor
from rag.store import RagError, Store, StoreLocked

from .conftest import LICENSES, consistent


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


def _count_files(db_path) -> int:
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=0.1)
        try:
            return con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_sigkill_mid_ingest_then_resume(tmp_path, crofter_home, embedder):
    docs = tmp_path / "docs"
    shutil.copytree(LICENSES, docs)
    env = {**os.environ, "CROFTER_HOME": str(crofter_home)}
    cmd = [sys.executable, "-m", "app.cli", "ingest", str(docs), "-c", "lic", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = crofter_home / "rag" / "catalog.sqlite3"
    deadline = time.monotonic() + 240
    while _count_files(db) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _count_files(db)
    n_files = sum(1 for p in docs.iterdir() if p.is_file())
    assert 0 < committed < n_files

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Store(crofter_home / "rag") as s:
        info = s.collection("lic")
        assert info.files == n_files and info.failed == 0
        consistent(s, "lic")
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()

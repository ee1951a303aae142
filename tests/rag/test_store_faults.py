"""The document store under faults: damaged Chroma files and catalogue WAL (F4), schema versions (F8).

Every corruption is done for real to a real collection (licence texts, the bundled embedder),
whose vector index Chroma has persisted (`hnsw_sync_threshold=10`: below its threshold Chroma
replays its SQLite log instead of reading the HNSW files, so damage there would be invisible).
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from rag import verify
from rag.ingest import Ingestor
from rag.store import RagError, Store, StoreDamaged

from .conftest import LICENSES, consistent


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embedder):
    """A store with one collection 'lic' (two licence files) and a persisted HNSW index; never modified."""
    root = tmp_path_factory.mktemp("pristine") / "rag"
    docs = root.parent / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(LICENSES / name, docs / name)
    with Store(root, hnsw_sync_threshold=10) as s:
        Ingestor(s, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([docs], "lic")
        probe = s.chunks("lic", s.chunk_ids("lic")[:1])
        text = next(iter(probe.values())).text
        top = [cid for cid, _ in s.dense("lic", embedder.encode([text])[0], 5)]
    db = sqlite3.connect(root / "chroma" / "chroma.sqlite3")
    persisted = db.execute("SELECT COUNT(*) FROM max_seq_id m JOIN segments s ON s.id = m.segment_id "
                           "WHERE s.scope = 'VECTOR' AND m.seq_id > 0").fetchone()[0]
    db.close()
    assert persisted == 1, "the HNSW index was not persisted: the damage below would not be read by Chroma"
    return root, text, top


@pytest.fixture
def damaged(pristine, crofter_home):
    """A private copy of the pristine store at the app's store location (<CROFTER_HOME>/rag)."""
    root = crofter_home / "rag"
    shutil.copytree(pristine[0], root)
    return root


def _segment(root: Path) -> Path:
    (seg,) = [p for p in (root / "chroma").iterdir() if p.is_dir()]
    return seg


def _rebuilt_and_sound(root: Path, embedder, pristine, names=("lic",)):
    with Store(root, repair=True) as s:
        done = verify.repair(s, list(names), lambda name: embedder.encode)
    with Store(root) as s:  # opens clean again
        consistent(s, "lic")
        top = [cid for cid, _ in s.dense("lic", embedder.encode([pristine[1]])[0], 5)]
    assert top == pristine[2]  # the same neighbours as before the damage (same machine, same vectors)
    return done


def test_zeroed_hnsw_files_are_named_at_open_and_rebuilt(damaged, embedder, pristine):
    for f in _segment(damaged).glob("*.bin"):
        f.write_bytes(bytes(f.stat().st_size))
    with pytest.raises(StoreDamaged, match=r"header\.bin: not an HNSW header .*all zero.*"
                                           r"`crofter collections rebuild lic`"):
        Store(damaged)
    old_seg = _segment(damaged)
    assert _rebuilt_and_sound(damaged, embedder, pristine) == [("lic", len(_chunk_ids(damaged)))]
    assert not old_seg.exists()  # the damaged segment folder is gone, a fresh one replaced it


def _chunk_ids(root: Path) -> list[str]:
    with Store(root) as s:
        return s.chunk_ids("lic")


@pytest.mark.parametrize("target", ["data_level0.bin", "link_lists.bin", "length.bin"])
def test_random_bytes_in_hnsw_files_are_caught_before_chroma_reads_them(damaged, target):
    """Random bytes in data_level0.bin make Chroma 1.5 segfault on the first query: refused first."""
    f = _segment(damaged) / target
    f.write_bytes(random.Random(target).randbytes(f.stat().st_size))
    with pytest.raises(StoreDamaged, match=rf"{target}: damaged"):
        Store(damaged)


def test_missing_segment_folder_is_named(damaged):
    """Without its folder Chroma answers queries silently wrong (one stale hit): refused instead."""
    shutil.rmtree(_segment(damaged))
    with pytest.raises(StoreDamaged, match=r"header\.bin: missing"):
        Store(damaged)


def _flip_btree_pages(db_path: Path, seed: int, n_pages: int = 3) -> list[int]:
    """Invert the page-type and cell-count bytes of seeded in-use b-tree pages of Chroma's tables."""
    db = sqlite3.connect(db_path)
    pages = [r[0] for r in db.execute(
        "SELECT pageno FROM dbstat WHERE name IN ('embeddings', 'embedding_metadata', 'segments', 'collections', "
        "'max_seq_id') ORDER BY pageno")]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    chosen = random.Random(seed).sample(pages, min(n_pages, len(pages)))
    data = bytearray(db_path.read_bytes())
    for pg in chosen:
        base = (pg - 1) * size + (100 if pg == 1 else 0)
        for off in (0, 3, 4):
            data[base + off] ^= 0xFF
    db_path.write_bytes(bytes(data))
    return chosen


def _flipped_chroma_sqlite_round(root: Path, seed: int, embedder, pristine) -> None:
    _flip_btree_pages(root / "chroma" / "chroma.sqlite3", seed)
    with pytest.raises(StoreDamaged, match=r"chroma\.sqlite3: damaged .*`crofter collections rebuild` to re-embed "
                                           r"every collection"):
        Store(root)
    _rebuilt_and_sound(root, embedder, pristine, names=())
    assert len(list(root.glob("chroma.damaged-*"))) == 1  # set aside for inspection, not deleted


def test_flipped_bytes_in_chroma_sqlite_are_detected_and_rebuilt(damaged, embedder, pristine):
    _flipped_chroma_sqlite_round(damaged, 0, embedder, pristine)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 21))
def test_flipped_bytes_in_chroma_sqlite_many_seeds(damaged, embedder, pristine, seed):
    _flipped_chroma_sqlite_round(damaged, seed, embedder, pristine)


KILLED_WRITER = r"""
import os, sys
from rag.store import Store
s = Store(sys.argv[1])
s.remove_files("lic", [sys.argv[2]])      # one committed catalogue transaction, still in the -wal
print("committed", flush=True)
os.kill(os.getpid(), 9)
"""


def test_deleted_catalogue_wal_is_detected_and_rebuild_restores_consistency(damaged, embedder, pristine):
    with Store(damaged) as s:
        victim = s.files("lic")[0].path
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(damaged), victim], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL and "committed" in r.stdout
    wal = damaged / "catalog.sqlite3-wal"
    assert wal.stat().st_size > 0
    wal.unlink()
    with pytest.raises(StoreDamaged, match=r"catalog\.sqlite3-wal is missing.*committed page.*"
                                           r"`crofter collections rebuild`"):
        Store(damaged)
    # The removal was lost with the WAL: the catalogue still lists the file, Chroma lost its vectors.
    with Store(damaged, repair=True) as s:
        assert s.lost_catalogue_wal and victim in [f.path for f in s.files("lic")]
        verify.repair(s, [], lambda name: embedder.encode)
    assert list(damaged.glob("catalog.sqlite3-shm.damaged-*"))
    with Store(damaged) as s:
        consistent(s, "lic")
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_rebuild_command_and_chat_history_while_the_store_is_damaged(damaged, crofter_home, embedder, monkeypatch):
    from app import documents
    from app.commands.docs import run_collections
    from app.history import HistoryStore

    (_segment(damaged) / "header.bin").write_bytes(bytes(100))
    env = {**os.environ, "CROFTER_HOME": str(crofter_home)}
    h = HistoryStore()  # the history is another file: damage to the document store leaves chat alone
    chat = h.new_chat(title="still here")
    h.add_message(chat.id, "user", "hello while the index is broken")
    h.close()
    r = subprocess.run([sys.executable, "-m", "app.cli", "collections", "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "header.bin" in err[0] and "crofter collections rebuild lic" in err[0]
    r = subprocess.run([sys.executable, "-m", "app.cli", "chats", "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "still here" in r.stdout
    monkeypatch.setitem(documents._EMBEDDERS, "all-MiniLM-L6-v2", embedder)  # the one already loaded
    assert run_collections(Namespace(collections_command="rebuild", names=["lic"], chroma_url=None)) == 0
    with Store(damaged) as s:
        consistent(s, "lic")


# --- F8: schema versions ----------------------------------------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_catalogue_from_an_older_crofter_is_backed_up_then_migrated(damaged, monkeypatch):
    """This build plus one migration plays the newer crofter; the pristine catalogue is the older store."""
    import rag.store

    before = _sha(damaged / "catalog.sqlite3")
    older = [n for n, _ in rag.store.MIGRATIONS]
    newer = [*rag.store.MIGRATIONS, ("0099_file_notes", "ALTER TABLE files ADD COLUMN note TEXT;")]
    monkeypatch.setattr(rag.store, "MIGRATIONS", newer)
    with Store(damaged) as s:
        assert [r[0] for r in s.db.execute("SELECT name FROM migrations ORDER BY name")] == [n for n, _ in newer]
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == len(newer)
        assert s.db.execute("SELECT COUNT(*) FROM files WHERE note IS NULL").fetchone()[0] == 2
    backup = damaged / f"catalog.sqlite3.bak-{len(older)}"
    assert backup.is_file()
    db = sqlite3.connect(backup)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r[0] for r in db.execute("SELECT name FROM migrations ORDER BY name")] == older
    assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] > 0
    db.close()
    assert before != _sha(damaged / "catalog.sqlite3")


def test_catalogue_from_a_newer_crofter_is_refused_untouched(damaged):
    db = sqlite3.connect(damaged / "catalog.sqlite3")
    db.execute("INSERT INTO migrations VALUES ('0007_future_thing', 0)")
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    before = {p.name: _sha(p) for p in damaged.rglob("*") if p.is_file() and p.name != "lock"}
    with pytest.raises(RagError, match=r"written by a newer crofter \(schema version 7, migration '0007_future_thing'\)"
                                       r".*schema is version 7 or newer \(nothing was changed\)"):
        Store(damaged)
    after = {p.name: _sha(p) for p in damaged.rglob("*") if p.is_file() and p.name != "lock"}
    assert after == before and not list(damaged.glob("*.bak-*"))
    with pytest.raises(RagError, match="newer crofter"):
        Store(damaged, repair=True)

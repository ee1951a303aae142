"""The chat history under faults: two writers (F3), a deleted -wal (F4), schema versions (F8),
a read-only data dir and a full disk (F9). Every process boundary is a real subprocess."""
from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app.history import MIGRATIONS, HistoryError, HistoryStore
from rag import sqlitedb


def _integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- F3: two crofters writing one history.db -------------------------------------------------------

WRITER = r"""
import sys, time
from pathlib import Path
from app.history import HistoryStore
path, tag, n, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():          # both start writing at the same moment
    time.sleep(0.001)
s = HistoryStore(path)           # a brand-new file: both race to migrate it too
chat = s.new_chat(title=tag)
for i in range(n):
    s.add_message(chat.id, "user", f"{tag} message {i}")
print(chat.id, flush=True)
"""


def _two_writers(tmp_path: Path, n: int) -> None:
    path, go = tmp_path / "shared" / "history.db", tmp_path / "go"
    path.parent.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(n), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("alpha", "beta")]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-400:] for o in outs]
    assert _integrity(path) == "ok"
    s = HistoryStore(path)
    for tag, (out, _) in zip(("alpha", "beta"), outs):
        msgs = s.messages(int(out))
        assert [m.content for m in msgs] == [f"{tag} message {i}" for i in range(n)]  # every one, in order
    assert [r[0] for r in s.db.execute("SELECT name FROM _migrations ORDER BY name")] == [n for n, _ in MIGRATIONS]
    s.close()


def test_two_processes_writing_one_history_lose_nothing(tmp_path):
    _two_writers(tmp_path, 150)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_two_processes_writing_one_history_many_trials(tmp_path, trial):
    _two_writers(tmp_path, 400)


# --- F4: the -wal deleted after a crash --------------------------------------------------------------

KILLED = r"""
import os, sys
from app.history import HistoryStore
s = HistoryStore()
chat = s.new_chat(title="before the crash")
for i in range(5):
    s.add_message(chat.id, "user", f"committed {i}")
print("committed", flush=True)
os.kill(os.getpid(), 9)
"""


def test_deleted_history_wal_is_named_at_open(crofter_home):
    HistoryStore().close()  # a checkpointed, closed database: the crash's commits live only in the WAL
    r = subprocess.run([sys.executable, "-c", KILLED], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL and "committed" in r.stdout
    db = crofter_home / "history.db"
    Path(f"{db}-wal").unlink()
    with pytest.raises(HistoryError, match=r"history\.db-wal is missing, but history\.db-shm says it held \d+ "
                                           r"committed page.*move history\.db-shm out of"):
        HistoryStore()
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "app.cli", "chats", "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "history.db-wal" in r.stderr
    shutil.move(f"{db}-shm", crofter_home / "lost-shm")  # what the message tells the user to do
    s = HistoryStore()
    assert s.chats() == []  # the crash's commits are gone with the WAL; the rest is sound
    s.close()
    assert _integrity(db) == "ok"


def test_a_crash_with_its_wal_kept_loses_nothing(crofter_home):
    HistoryStore().close()
    r = subprocess.run([sys.executable, "-c", KILLED], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    s = HistoryStore()  # the -shm check stays quiet when the -wal is there
    assert [m.content for m in s.messages(s.chats()[0].id)] == [f"committed {i}" for i in range(5)]
    s.close()


# --- F8: older and newer history databases ------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2])
def test_history_from_an_older_crofter_is_backed_up_then_migrated(tmp_path, n):
    path = tmp_path / "history.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert sqlitedb.migrate(db, path, MIGRATIONS[:n], "_migrations") == [m for m, _ in MIGRATIONS[:n]]
    db.execute("INSERT INTO chats (title, model, system_prompt, created, updated) VALUES ('old zebra', NULL, '', 0, 0)")
    db.execute("INSERT INTO messages (chat_id, role, content, created) VALUES (1, 'user', 'legacy zebra text', 0)")
    db.close()
    old = _sha(path)
    s = HistoryStore(path)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert [h.chat_title for h in s.search("zebra")] == ["old zebra"]
    assert s.chat(1).collections == []
    s.close()
    backup = tmp_path / f"history.db.bak-{n}"
    assert _integrity(backup) == "ok"
    db = sqlite3.connect(backup)  # the database as the older crofter left it
    assert [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY name")] == [m for m, _ in MIGRATIONS[:n]]
    assert db.execute("SELECT content FROM messages").fetchall() == [("legacy zebra text",)]
    db.close()
    assert _sha(path) != old
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in tmp_path.glob("history.db.bak-*")) == [backup.name]


def test_new_history_makes_no_backup(tmp_path):
    HistoryStore(tmp_path / "history.db").close()
    assert not list(tmp_path.glob("*.bak-*"))


@pytest.mark.parametrize("how", ["migration", "user_version"])
def test_history_from_a_newer_crofter_is_refused_untouched(tmp_path, how):
    path = tmp_path / "history.db"
    HistoryStore(path).close()
    db = sqlite3.connect(path)
    future = len(MIGRATIONS) + 1  # one migration past this crofter's last
    if how == "migration":
        db.execute(f"INSERT INTO _migrations VALUES ('{future:03d}_from_the_future', 0)")
    db.execute(f"PRAGMA user_version = {future + 5}" if how == "user_version" else f"PRAGMA user_version = {future}")
    db.commit()
    db.close()
    before = _sha(path)
    want = (rf"schema version {future}, migration '{future:03d}_from_the_future'" if how == "migration" else
            rf"schema version {future + 5}, user_version {future + 5}")
    with pytest.raises(HistoryError, match=rf"written by a newer crofter \({want}\); this crofter reads schema "
                                           rf"version {len(MIGRATIONS)} or older.*nothing was changed"):
        HistoryStore(path)
    assert _sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["history.db"]


# --- F9: read-only data dir, full disk ------------------------------------------------------------------

def _readonly_runner(folder: Path) -> list[str]:
    """A command prefix that runs with `folder` read-only for real, or skip.

    Not root: chmod a-w. Root ignores modes, so a private mount namespace binds the folder
    read-only (EROFS, as on a read-only disk); nothing outside the child sees it."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return []
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{folder}" "{folder}" && '
                            f'! touch "{folder}/probe" 2>/dev/null'], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a folder read-only")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]


def test_read_only_data_dir_reads_work_and_changes_are_refused(crofter_home):
    s = HistoryStore()
    chat = s.new_chat(title="Read me later")
    s.add_message(chat.id, "user", "where is the aardvark")
    s.add_message(chat.id, "assistant", "behind the barn")
    s.close()
    db = crofter_home / "history.db"
    before = _sha(db)
    prefix = _readonly_runner(crofter_home)
    env = {**os.environ}

    def crofter(*argv):
        return subprocess.run([*prefix, sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True, env=env)

    r = crofter("chats", "list")
    assert r.returncode == 0 and "Read me later" in r.stdout, r.stderr
    r = crofter("chats", "show", str(chat.id))
    assert r.returncode == 0 and "behind the barn" in r.stdout
    r = crofter("chats", "search", "aardvark")
    assert r.returncode == 0 and "[aardvark]" in r.stdout
    r = crofter("chats", "rm", str(chat.id))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "history.db is read-only" in err[0] and "nothing was saved" in err[0]
    if os.geteuid() != 0:
        for p in [crofter_home, *crofter_home.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert _sha(db) == before
    s = HistoryStore()
    assert [m.content for m in s.messages(chat.id)] == ["where is the aardvark", "behind the barn"]
    s.close()


FILLER = r"""
import sys
from app.history import HistoryError, HistoryStore
s = HistoryStore()
chat = s.chats()[0]
for i in range(100000):
    try:
        m = s.add_message(chat.id, "user", f"message {i} " + "x" * 3000)
    except HistoryError as exc:
        print("ERROR", exc, flush=True)
        sys.exit(3)
    print("committed", m.id, flush=True)
"""


def _fill_disk(crofter_home: Path, headroom: int) -> None:
    s = HistoryStore()
    s.new_chat(title="filling")
    s.close()
    limit = sum(p.stat().st_size for p in crofter_home.iterdir() if p.is_file()) + headroom

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-c", FILLER], capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert r.returncode == 3, r.stderr[-500:]
    lines = r.stdout.splitlines()
    committed = [int(x.split()[1]) for x in lines if x.startswith("committed")]
    errors = [x for x in lines if x.startswith("ERROR")]
    assert committed and len(errors) == 1 and "history.db: could not save" in errors[0]
    assert "nothing was saved" in errors[0]
    assert _integrity(crofter_home / "history.db") == "ok"
    s = HistoryStore()
    assert [m.id for m in s.messages(s.chats()[0].id)] == committed  # all committed, nothing half-written
    s.add_message(s.chats()[0].id, "user", "space again")  # and it writes again once there is room
    s.close()


def test_disk_full_while_the_history_writes(crofter_home):
    _fill_disk(crofter_home, 200_000)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_disk_full_while_the_history_writes_many_limits(crofter_home, seed):
    _fill_disk(crofter_home, 40_000 + seed * 23_117)

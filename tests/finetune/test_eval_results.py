"""The evaluation results store (finetune/evaluate/results.py); `compare` is in test_eval_compare.py.

Issue 19, item 7: every result stored with the model's hash, suite, metric, value, stderr, n,
date and version, found again by name or hash prefix; a damaged or foreign file is refused by name.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from finetune.evaluate import results
from finetune.evaluate.results import ResultStore, model_hash
from finetune.evaluate.rows import EvalError, Row

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
H_BASE, H_SFT, H_BASE2 = "a1" * 32, "b2" * 32, "c3" * 32


def by_key(rows):
    return {(r.suite, r.task, r.metric): r for r in rows}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p != path)


# -- the store ------------------------------------------------------------------------------

def test_two_runs_latest_is_the_newest_value_per_metric_by_name_and_by_hash_prefix():
    store = ResultStore()
    assert store.path == Path(os.environ["CROFTER_HOME"]) / "eval" / "results.sqlite"
    r1 = store.add([Row("base", "tasks", "arc", "acc", 0.30, 0.02, 500),
                    Row("base", "perplexity", "wiki", "ppl", 20.5, 0.2, 4096),
                    Row("sft", "tasks", "arc", "acc", 0.45, 0.02, 500)],
                   {"base": H_BASE, "sft": H_SFT}, "0.1.0", {"limit": 500, "num_fewshot": 0}, when=T0)
    r2 = store.add([Row("base", "tasks", "arc", "acc", 0.35, 0.02, 500)], {"base": H_BASE}, "0.2.0",
                   when=T0 + timedelta(days=1))
    # A run recorded later but dated earlier (an imported result) is not the newest.
    store.add([Row("base", "tasks", "arc", "acc", 0.10, 0.02, 500)], {"base": H_BASE}, "0.0.9",
              when=T0 - timedelta(days=1))
    assert (r1, r2) == (1, 2)
    store.close()

    store = ResultStore()  # reopened: everything was committed
    latest = by_key(store.latest("base"))
    assert set(latest) == {("tasks", "arc", "acc"), ("perplexity", "wiki", "ppl")}
    acc, ppl = latest[("tasks", "arc", "acc")], latest[("perplexity", "wiki", "ppl")]
    assert (acc.value, acc.run_id, acc.crofter_version) == (0.35, 2, "0.2.0")
    assert acc.created == "2025-03-02T12:00:00+00:00"
    assert (ppl.value, ppl.stderr, ppl.n, ppl.run_id, ppl.model_hash) == (20.5, 0.2, 4096, 1, H_BASE)
    assert ppl.extra == {"limit": 500, "num_fewshot": 0}
    # The same lookup by a hash prefix (8 digits, any case) and by the whole hash.
    assert by_key(store.latest(H_BASE[:8].upper())) == latest
    assert by_key(store.latest(H_BASE)) == latest
    assert [r.value for r in store.latest("sft")] == [0.45]
    assert store.latest(H_BASE[:7]) == [] and store.latest("nobody") == []

    got = {m.name: m for m in store.models()}
    assert set(got) == {"base", "sft"}
    assert (got["base"].model_hash, got["base"].rows, got["base"].last) == (H_BASE, 4, "2025-03-02T12:00:00+00:00")
    runs = store.runs()
    assert [r.id for r in runs] == [2, 1, 3]  # newest first, by date
    assert (runs[1].models, runs[1].rows, runs[1].extra) == (("base", "sft"), 3, {"limit": 500, "num_fewshot": 0})
    assert [r.value for r in store.rows(1)] == [0.30, 20.5, 0.45]


def test_a_name_evaluated_with_new_bytes_means_its_newest_file_and_the_old_hash_still_finds_the_old_rows():
    store = ResultStore()
    store.add([Row("base", "tasks", "arc", "acc", 0.30, 0.02, 500)], {"base": H_BASE}, "0.1", when=T0)
    # "base" retrained: new bytes, measured only on perplexity. Its old acc must not be mixed in.
    store.add([Row("base", "perplexity", "wiki", "ppl", 19.0, 0.2, 4096)], {"base": H_BASE2}, "0.1",
              when=T0 + timedelta(hours=1))
    assert [(r.metric, r.model_hash) for r in store.latest("base")] == [("ppl", H_BASE2)]
    assert [(r.metric, r.value) for r in store.latest(H_BASE[:10])] == [("acc", 0.30)]
    # The same bytes stored under another name (evaluated by path) count for both names.
    store.add([Row("out/model.gguf", "speed", "speed", "decode_tok_s", 250.0, None, 64)],
              {"out/model.gguf": H_BASE2}, "0.1", when=T0 + timedelta(hours=2))
    assert {r.metric for r in store.latest("base")} == {"ppl", "decode_tok_s"}


def test_an_ambiguous_hash_prefix_is_refused_with_the_candidates():
    store = ResultStore()
    h1, h2 = "abcdef01" + "0" * 56, "abcdef01" + "1" * 56
    store.add([Row("x", "tasks", "t", "acc", 0.5, 0.1, 10), Row("y", "tasks", "t", "acc", 0.6, 0.1, 10)],
              {"x": h1, "y": h2}, "0.1")
    with pytest.raises(EvalError, match="abcdef01.*matches 2 models"):
        store.latest("abcdef01")
    assert [r.model for r in store.latest("abcdef011")] == ["y"]


def test_bad_rows_are_refused_and_a_failed_add_stores_nothing():
    store = ResultStore()
    ok = Row("m", "tasks", "arc", "acc", 0.5, 0.02, 100)
    with pytest.raises(EvalError, match="no model hash given for 'other'"):
        store.add([ok, Row("other", "tasks", "arc", "acc", 0.5)], {"m": H_BASE}, "0.1")
    with pytest.raises(EvalError, match="m / bogus / arc / acc: unknown suite 'bogus'"):
        store.add([Row("m", "bogus", "arc", "acc", 0.5)], {"m": H_BASE}, "0.1")
    with pytest.raises(EvalError, match="m / tasks / arc / acc: value nan is not a number"):
        store.add([Row("m", "tasks", "arc", "acc", float("nan"))], {"m": H_BASE}, "0.1")
    with pytest.raises(EvalError, match="run extra is not JSON"):
        store.add([ok], {"m": H_BASE}, "0.1", extra={"when": object()})
    # SQLite refuses the second row (an item count past 64 bits) after the run row and the
    # first result were inserted: the one transaction leaves neither behind.
    with pytest.raises(OverflowError):
        store.add([ok, Row("m", "tasks", "hella", "acc", 0.5, 0.02, 2 ** 70)], {"m": H_BASE}, "0.1")
    assert store.runs() == [] and store.latest("m") == []
    assert store.add([ok], {"m": H_BASE}, "0.1") >= 1


def test_two_stores_on_one_file_both_commit_their_runs():
    a, b = ResultStore(), ResultStore()
    a.add([Row("x", "tasks", "t", "acc", 0.5, 0.1, 10)], {"x": H_BASE}, "0.1", when=T0)
    b.add([Row("y", "tasks", "t", "acc", 0.6, 0.1, 10)], {"y": H_SFT}, "0.1", when=T0)
    a.add([Row("x", "tasks", "t", "acc", 0.7, 0.1, 10)], {"x": H_BASE}, "0.1", when=T0 + timedelta(1))
    assert [r.id for r in b.runs()] == [3, 2, 1] and [r.value for r in b.latest("x")] == [0.7]


def readonly_prefix(folder: Path) -> list[str]:
    """Run a child with `folder` read-only for real (root ignores modes: a private ro bind mount)."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return []
    script = f'mount --bind -o ro "{folder}" "{folder}" && ! touch "{folder}/probe" 2>/dev/null'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, check=False)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a folder read-only")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]


def test_a_read_only_store_is_read_and_refuses_to_add(tmp_path):
    store = ResultStore()
    store.add([Row("base", "tasks", "arc", "acc", 0.30, 0.02, 500)], {"base": H_BASE}, "0.1")
    store.close()
    folder = store.path.parent
    blob = store.path.read_bytes()
    gguf = folder / "m.gguf"
    gguf.write_bytes(b"gguf bytes")
    code = ("from finetune.evaluate.results import ResultStore; from finetune.evaluate.rows import Row, EvalError\n"
            "s = ResultStore(); print([r.value for r in s.latest('a1a1a1a1')], s.hash_of(s.path.parent / 'm.gguf'))\n"
            "try: s.add([Row('x', 'tasks', 't', 'acc', 0.1)], {'x': 'ab' * 32}, '0.1')\n"
            "except EvalError as e: print(e)")
    out = subprocess.run([*readonly_prefix(folder), sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=False)
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"[0.3] {hashlib.sha256(b'gguf bytes').hexdigest()}"
    assert lines[1] == f"{store.path}: the results store's folder is read-only; nothing was stored"
    assert store.path.read_bytes() == blob and sorted(p.name for p in folder.iterdir()) == ["m.gguf", "results.sqlite"]


# -- model hashes and their cache -------------------------------------------------------------

def make_checkpoint(folder: Path, seed: int) -> Path:
    rnd = random.Random(seed)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(rnd.randbytes(3 * results.BLOCK + 17))  # several blocks
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("not part of the model")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.json").write_text("{}")
    return folder


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, same size, and move the mtime on (coarse clocks may not)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_file_and_folder_hashes_follow_every_model_byte_and_ignore_the_rest(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(random.Random(1).randbytes(2 * results.BLOCK + 5))
    assert model_hash(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()
    before = model_hash(gguf)
    flip_byte(gguf, results.BLOCK + 3)
    assert model_hash(gguf) != before

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=2)
    h = model_hash(ckpt)
    (ckpt / "README.md").write_text("edited")
    (ckpt / ".cache" / "download.json").write_text('{"etag": 1}')
    assert model_hash(ckpt) == h  # neither is part of the model
    flip_byte(ckpt / "config.json", 2)
    h2 = model_hash(ckpt)
    assert h2 != h
    flip_byte(ckpt / "model.safetensors", 3 * results.BLOCK + 10)  # in the last, short block
    assert model_hash(ckpt) not in (h, h2)

    adapter = make_checkpoint(tmp_path / "lora", seed=3)
    with_adapter = model_hash(ckpt, adapter)
    assert with_adapter not in (model_hash(ckpt), model_hash(adapter))
    flip_byte(adapter / "model.safetensors", 0)
    assert model_hash(ckpt, adapter) != with_adapter

    with pytest.raises(EvalError, match=f"{tmp_path / 'nope'}: no such model file or folder"):
        model_hash(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="empty: no \\*.safetensors"):
        model_hash(tmp_path / "empty")


def test_the_store_hashes_each_file_once_and_rehashes_it_when_it_changes(tmp_path, monkeypatch):
    reads = []
    real = results.file_sha256
    monkeypatch.setattr(results, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(random.Random(4).randbytes(results.BLOCK + 1))
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5)

    store = ResultStore()
    h = store.hash_of(gguf)
    assert h == real(gguf) and reads == ["m.gguf"]
    assert store.hash_of(gguf) == h and reads == ["m.gguf"]  # served from the cache
    assert store.cached_hashes() == {str(gguf.resolve()): h}
    hf = store.hash_of(ckpt)
    assert hf == model_hash(ckpt, file_hash=real)
    assert sorted(reads) == ["config.json", "m.gguf", "model.safetensors", "tokenizer.json"]
    store.close()

    reads.clear()
    store = ResultStore()  # the cache lives in the store file
    assert (store.hash_of(gguf), store.hash_of(ckpt), reads) == (h, hf, [])
    flip_byte(gguf, 7)
    flip_byte(ckpt / "tokenizer.json", 1)
    assert store.hash_of(gguf) == real(gguf) != h
    assert store.hash_of(ckpt) == model_hash(ckpt, file_hash=real) != hf
    assert reads == ["m.gguf", "tokenizer.json"]  # only the changed files were read again
    # An atomic replace with the same size and mtime is a new inode: hashed again too.
    data = bytearray(gguf.read_bytes())
    data[0] ^= 1
    st = gguf.stat()
    (tmp_path / "new").write_bytes(bytes(data))
    os.utime(tmp_path / "new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "new", gguf)
    assert store.hash_of(gguf) == hashlib.sha256(bytes(data)).hexdigest()


# -- a store that is not ours ------------------------------------------------------------------

def test_a_file_of_random_bytes_is_refused_by_name_and_left_untouched(tmp_path):
    path = tmp_path / "results.sqlite"
    blob = random.Random(6).randbytes(3 * 4096)
    path.write_bytes(blob)
    with pytest.raises(EvalError) as err:
        ResultStore(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a crofter results database, or a damaged one")
    assert path.read_bytes() == blob and siblings(path) == []


def test_a_store_from_a_newer_crofter_or_of_another_program_is_refused_and_unchanged(tmp_path):
    newer = tmp_path / "newer.sqlite"
    ResultStore(newer).close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    blob = newer.read_bytes()
    with pytest.raises(EvalError, match=f"{newer} was written by a newer crofter \\(schema version 99"):
        ResultStore(newer)
    assert newer.read_bytes() == blob

    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE invoices (id INTEGER)")
    db.commit()
    db.close()
    blob = other.read_bytes()
    with pytest.raises(EvalError, match=f"{other}: an SQLite database of something else \\(tables invoices\\)"):
        ResultStore(other)
    assert other.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newer.sqlite", "other.sqlite"]  # no -wal, no -journal


@pytest.mark.parametrize("damage", ["truncated", "garbage pages"])
def test_a_damaged_store_fails_with_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "results.sqlite"
    store = ResultStore(path)
    store.add([Row(f"m{i}", "tasks", f"task{i}", "acc", i / 500, 0.01, 100) for i in range(500)],
              {f"m{i}": f"{i:064x}" for i in range(500)}, "0.1")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    size = path.stat().st_size
    assert size >= 8 * 4096
    with open(path, "r+b") as fh:
        if damage == "truncated":  # found when the schema is read
            fh.truncate(size // 2)
        else:  # page 1 (the schema) intact: found only when the results are read
            fh.seek(2 * 4096)
            fh.write(random.Random(7).randbytes(size - 2 * 4096))
    blob = path.read_bytes()
    with pytest.raises(EvalError) as err:
        ResultStore(path).models()
    assert str(err.value).startswith(f"{path}: ") and "malformed" in str(err.value)
    assert path.read_bytes() == blob

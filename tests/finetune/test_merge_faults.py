"""`crofter tune merge` and `tune dpo` take a run folder; F6 for merge: kill -9 and disk full mid-merge.

Every merge here is the real CLI in a child process, merging the real SFT adapter into the real
135M base (a ~540 MB float32 checkpoint, so the write takes long enough to be cut).
"""
from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from models.registry import Registry


def _env(crofter_home) -> dict:
    return {**os.environ, "CROFTER_HOME": str(crofter_home)}


def merge_cmd(hf_model, adapter, out) -> list[str]:
    return [sys.executable, "-m", "app.cli", "tune", "merge", "--base", str(hf_model), "--adapter", str(adapter),
            "--out", str(out)]


def partials(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".partial"))


def registered(out) -> list[str]:
    return [e.name for e in Registry().entries() if e.path == str(out) or e.name == out.name]


def seeded_point(seed: int) -> tuple[str, float]:
    """A kill point: while it loads (after a seeded delay), at a seeded fraction of the weights
    written, or while the tokenizer is written (then the tree is fsynced and renamed)."""
    rng = random.Random(seed)
    point = rng.choice(["load", "weights", "weights", "tokenizer"])
    return point, rng.uniform(0.5, 4.0) if point == "load" else rng.uniform(0.02, 0.9)


def kill_mid_merge(proc: subprocess.Popen, out, point: str, x: float, expected_bytes: int,
                   timeout: float = 900) -> str:
    """SIGKILL the merge at `point` (x: the delay for "load", the fraction of the weights for
    "weights"); returns where it landed."""
    deadline = time.monotonic() + timeout
    if point == "load":
        time.sleep(x)
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the merge ended before the {point} kill point"
        temps = [out.parent / n for n in partials(out)]
        if point == "load":
            break
        if temps and point == "weights":
            w = temps[-1] / "model.safetensors"
            if w.exists() and w.stat().st_size >= x * expected_bytes:
                break
        if temps and point == "tokenizer" and any(temps[-1].glob("tokenizer*")):
            break
        time.sleep(0.002)
    else:
        raise AssertionError(f"the {point} kill point was not reached in time")
    os.kill(proc.pid, signal.SIGSTOP)
    assert not out.exists(), "the merge finished before it could be killed"
    proc.kill()
    proc.wait()
    return f"{point}:{x:.2f}"


def check_killed_then_retry(hf_model, adapter, out, crofter_home) -> subprocess.CompletedProcess:
    assert not out.exists() and registered(out) == []
    r = subprocess.run(merge_cmd(hf_model, adapter, out), env=_env(crofter_home), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "crofter_merge.json").is_file()
    assert partials(out) == []  # the killed merge's temp was swept by the next one
    assert registered(out) == [out.name]
    return r


@pytest.fixture(scope="module")
def base_bytes(hf_model) -> int:
    return (hf_model / "model.safetensors").stat().st_size


def test_killed_merge_leaves_nothing_and_the_retry_takes_the_run_folder(hf_model, sft_run, tmp_path, crofter_home,
                                                                        base_bytes):
    out = tmp_path / "merged"
    proc = subprocess.Popen(merge_cmd(hf_model, sft_run.run_dir, out), env=_env(crofter_home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_mid_merge(proc, out, "weights", 0.3, base_bytes)
    assert len(partials(out)) == 1  # a half-written temp, never the final path
    r = check_killed_then_retry(hf_model, sft_run.run_dir, out, crofter_home)
    assert f"crofter: using the adapter in {sft_run.run_dir / 'adapter'}\n" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_merge_killed_at_twenty_seeded_points(hf_model, sft_run, tmp_path, crofter_home, base_bytes):
    out, landed = tmp_path / "merged", []
    for seed in range(20):  # each merge into `out` sweeps the temp the previous kill left
        proc = subprocess.Popen(merge_cmd(hf_model, sft_run.adapter, out), env=_env(crofter_home),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        landed.append(kill_mid_merge(proc, out, *seeded_point(seed), base_bytes))
        assert not out.exists() and registered(out) == []
    print(landed)
    check_killed_then_retry(hf_model, sft_run.adapter, out, crofter_home)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    assert {x.split(":")[0] for x in landed} == {"load", "weights", "tokenizer"}


def _limit_file_size(limit: int):
    def apply():  # in the child, before exec: writes past `limit` fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_merge_is_one_line_and_leaves_nothing(hf_model, sft_run, tmp_path, crofter_home):
    out = tmp_path / "merged"
    r = subprocess.run(merge_cmd(hf_model, sft_run.run_dir, out), env=_env(crofter_home), capture_output=True,
                       text=True, timeout=900, preexec_fn=_limit_file_size(64 << 20))
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("crofter: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{out}: writing the merged model failed" in errors[0] and "File too large" in errors[0], errors[0]
    assert not out.exists() and partials(out) == [] and registered(out) == []


def _killed_run_copy(sft_run, tmp_path):
    """The SFT run folder as a kill before the final save leaves it: checkpoints, no adapter/."""
    run = tmp_path / "killed-run"
    shutil.copytree(sft_run.run_dir, run, ignore=shutil.ignore_patterns("adapter"))
    return run


@pytest.mark.parametrize("action", ["merge", "dpo"])
def test_a_run_folder_without_its_adapter_is_refused_naming_the_last_checkpoint(
        hf_model, sft_run, persona_prefs, tmp_path, crofter_home, action):
    run = _killed_run_copy(sft_run, tmp_path)
    out = tmp_path / "out"
    if action == "merge":
        cmd = merge_cmd(hf_model, run, out)
    else:
        cmd = [sys.executable, "-m", "app.cli", "tune", "dpo", "--base", str(hf_model), "--data", str(persona_prefs),
               "--adapter", str(run), "--out", str(out), "--max-steps", "1"]
    r = subprocess.run(cmd, env=_env(crofter_home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{run}: this run folder has no adapter/" in r.stderr
    assert f"last complete checkpoint is {run / 'checkpoints' / 'checkpoint-16'}" in r.stderr
    assert not out.exists() and registered(out) == []


def test_a_plain_adapter_folder_still_merges_without_a_note(hf_model, sft_run, tmp_path, capsys):
    from finetune.train import merge

    out = merge(hf_model, sft_run.adapter, tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    assert "using the adapter" not in capsys.readouterr().err

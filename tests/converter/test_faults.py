"""F6: kill -9 and a full disk during convert and quantize. The final path holds nothing or the
previous good file; the error is one line; no temp file outlives the next run."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, crofter, error_lines, fsize_limit, tiny_llama

FAST_SEEDS = [0, 1]
SLOW_SEEDS = list(range(2, 22))


def _partials(out):
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # swept between the listing and the stat
        return 0


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny(hf_model, tmp_path):
    return tiny_llama(hf_model, tmp_path / "tiny")


def _kill_at(cmd: list[str], out, home, expected: float, fraction: float) -> None:
    """Start `crofter CMD`, SIGKILL it once its temp file holds `fraction` of `expected` bytes."""
    earlier = set(_partials(out))  # a killed run's leftover: this run must sweep it, not be judged by it
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "CROFTER_HOME": str(home)})
    deadline = time.monotonic() + 300
    grown = []
    while proc.poll() is None and time.monotonic() < deadline:
        grown = [p for p in _partials(out) if p not in earlier and _size(p) >= fraction * expected]
        if grown:
            break
        time.sleep(0.01)
    assert grown, "the run finished or never wrote: " + (proc.stderr.read().decode() if proc.poll() is not None else "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _kill_quantize_at(f16, out, home, fraction: float) -> None:
    expected = f16.stat().st_size * 0.35  # Q4_K_M is ~0.3-0.4 of F16 for this model
    _kill_at(["quantize", str(f16), str(out), "--type", "Q4_K_M", "--no-verify", "--no-register"], out, home,
             expected, fraction)


def _kill_quantize_trials(smol_f16, tmp_path, home, seeds) -> None:
    out = tmp_path / "smol-Q4_K_M.gguf"
    left = None
    for seed in seeds:
        _kill_quantize_at(smol_f16, out, home, random.Random(seed).uniform(0.05, 0.9))
        assert not out.exists()
        now = _partials(out)
        assert len(now) == 1 and now[0] != left  # this run swept the previous run's temp file
        left = now[0]
    r = crofter("quantize", str(smol_f16), str(out), "--type", "Q4_K_M", "--no-verify", "--no-register", home=home)
    assert r.returncode == 0, r.stderr
    assert out.exists() and _partials(out) == []  # the next run swept the last one and completed
    good = _sha(out)
    _kill_quantize_at(smol_f16, out, home, 0.5)  # a kill while a good file is in place leaves it be
    assert _sha(out) == good


def test_kill_9_mid_quantize_leaves_no_final_file(smol_f16, tmp_path, crofter_home):
    _kill_quantize_trials(smol_f16, tmp_path, crofter_home, FAST_SEEDS)


@pytest.mark.slow
def test_kill_9_mid_quantize_many_seeds(smol_f16, tmp_path, crofter_home):
    _kill_quantize_trials(smol_f16, tmp_path, crofter_home, SLOW_SEEDS)


@pytest.mark.slow
def test_kill_9_mid_convert_many_seeds(hf_model, tmp_path, crofter_home):
    """The fast tier kills one convert (tests/converter/test_convert.py); here at 20 seeded points."""
    out = tmp_path / "smol-F32.gguf"
    cmd = ["convert", str(hf_model), "--out", str(out), "--outtype", "f32", "--no-verify", "--no-register"]
    expected = 540e6  # 135M weights as float32
    left = None
    for seed in SLOW_SEEDS:
        _kill_at(cmd, out, crofter_home, expected, random.Random(seed).uniform(0.02, 0.95))
        assert not out.exists()
        now = _partials(out)
        assert len(now) == 1 and now[0] != left  # this run swept the previous run's temp file
        left = now[0]
    r = crofter(*cmd, home=crofter_home)
    assert r.returncode == 0, r.stderr
    assert out.exists() and _partials(out) == []


def _full_disk_convert(tiny, tmp_path, home, seeds) -> None:
    out = tmp_path / "tiny-F16.gguf"
    ref = tmp_path / "ref.gguf"
    r = crofter("convert", str(tiny), "--out", str(ref), "--outtype", "f16", "--no-verify", "--no-register", home=home)
    assert r.returncode == 0, r.stderr
    size = ref.stat().st_size
    for seed in seeds:
        limit = int(size * random.Random(seed).uniform(0.4, 0.95))  # the vocabulary alone is ~1/3
        r = crofter("convert", str(tiny), "--out", str(out), "--outtype", "f16", "--no-verify", "--no-register",
                    home=home, preexec=fsize_limit(limit))
        assert r.returncode == 1
        want = f"crofter: error: writing {out} failed: the file size limit was reached (ulimit -f); nothing written at {out}"
        assert error_lines(r.stderr) == [want], (seed, limit, r.stderr)
        assert not out.exists() and _partials(out) == []
    # With a good file in place, a full disk leaves it as it was.
    out.write_bytes(ref.read_bytes())
    good = _sha(out)
    r = crofter("convert", str(tiny), "--out", str(out), "--outtype", "f32", "--no-verify", "--no-register",
                home=home, preexec=fsize_limit(size))  # F32 is twice F16: it cannot fit
    assert r.returncode == 1 and error_lines(r.stderr)[0].endswith(f"the previous {out} is unchanged"), r.stderr
    assert _sha(out) == good and _partials(out) == []


def test_full_disk_during_convert(tiny, tmp_path, crofter_home):
    _full_disk_convert(tiny, tmp_path, crofter_home, FAST_SEEDS)


@pytest.mark.slow
def test_full_disk_during_convert_many_seeds(tiny, tmp_path, crofter_home):
    _full_disk_convert(tiny, tmp_path, crofter_home, SLOW_SEEDS)


def _full_disk_quantize(smol_f16, tmp_path, home, seeds) -> None:
    out = tmp_path / "smol-Q8_0.gguf"
    expected = smol_f16.stat().st_size * 0.53  # Q8_0 is 8.5 bits a weight against F16's 16
    for seed in seeds:
        limit = int(expected * random.Random(seed).uniform(0.05, 0.9))
        r = crofter("quantize", str(smol_f16), str(out), "--type", "Q8_0", "--no-verify", "--no-register",
                    home=home, preexec=fsize_limit(limit))
        assert r.returncode == 1
        want = f"crofter: error: writing {out} failed: the file size limit was reached (ulimit -f); nothing written at {out}"
        assert error_lines(r.stderr) == [want], (seed, limit, r.stderr)
        assert not out.exists() and _partials(out) == []


def test_full_disk_during_quantize(smol_f16, tmp_path, crofter_home):
    _full_disk_quantize(smol_f16, tmp_path, crofter_home, FAST_SEEDS)


@pytest.mark.slow
def test_full_disk_during_quantize_many_seeds(smol_f16, tmp_path, crofter_home):
    _full_disk_quantize(smol_f16, tmp_path, crofter_home, SLOW_SEEDS)

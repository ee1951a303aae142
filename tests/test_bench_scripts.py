"""Every benchmark script compiles on the Python the suite runs on.

The benches are run by hand, so nothing else notices a syntax that only a newer Python accepts
(a nested f-string quote, for instance) until someone needs the figures.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py")) + [BENCH / "gpu_steps.py"]


def test_there_are_benches():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bench_compiles(script):
    compile(script.read_text(encoding="utf-8"), str(script), "exec")  # raises SyntaxError with the line


@pytest.mark.slow
def test_the_gpu_suite_rehearses_every_step_on_the_cpu(tmp_path):
    """bench/gpu_suite.sh --cpu-dry-run: each step small; all run, and each leaves its figures."""
    import json
    import os

    out = tmp_path / "out"
    r = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--cpu-dry-run"], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable},
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:]
    steps = dict(line.split(" ", 1) for line in (out / "steps.txt").read_text().splitlines())
    assert set(steps) == {"imports", "model", "gpu_tests", "decode", "sft_fp32", "accelerate", "embed"}
    assert all(v.startswith("rc=0 ") for v in steps.values()), steps
    sft = json.loads((out / "sft_fp32.json").read_text())
    assert sft["crofter"]["tokens_per_s"] > 0 and sft["plain_trl"]["tokens_per_s"] > 0
    assert json.loads((out / "decode.json").read_text())["median"]["engine_cpu"] > 0

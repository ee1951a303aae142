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
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


def test_there_are_benches():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bench_compiles(script):
    compile(script.read_text(encoding="utf-8"), str(script), "exec")  # raises SyntaxError with the line

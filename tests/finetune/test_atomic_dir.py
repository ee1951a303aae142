"""Folders appear at their final path only when complete; killed writers' temps are swept, live ones kept."""
from __future__ import annotations

import subprocess
import sys

import pytest

from models.atomic import atomic_dir, sweep_stale_partial_dirs


def test_the_folder_appears_only_when_the_block_completes(tmp_path):
    final = tmp_path / "merged"
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        assert not final.exists() and tmp.name.startswith(".merged.") and tmp.name.endswith(".partial")
    assert (final / "model.safetensors").read_bytes() == b"x" * 10
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_an_error_removes_the_temp_and_leaves_no_final(tmp_path):
    final = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(final) as tmp:
            (tmp / "part").write_bytes(b"x")
            raise OSError(28, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_replace_swaps_an_existing_folder_and_refuses_without_it(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_dir(final) as tmp:
            (tmp / "new").write_text("2")
    assert [p.name for p in final.iterdir()] == ["old"]
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in final.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_killed_writers_temp_is_swept_and_a_live_ones_is_kept(tmp_path):
    final = tmp_path / "merged"
    code = ("import os, sys; from pathlib import Path; from models.atomic import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
            "    print(tmp, flush=True); sys.stdin.readline(); os._exit(9)\n")  # dies inside the block, like kill -9
    live = subprocess.Popen([sys.executable, "-c", code, str(final)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    held = live.stdout.readline().strip()
    assert sweep_stale_partial_dirs(final) == []  # its writer holds it
    live.stdin.write("\n")
    live.stdin.flush()
    assert live.wait(timeout=60) == 9
    assert [str(p) for p in sweep_stale_partial_dirs(final)] == [held]
    assert list(tmp_path.iterdir()) == []

"""F7: `crofter tune sft` killed with SIGKILL while it saves a checkpoint, at seeded points, then resumed.

The kill lands inside a save for certain: when the newest checkpoint reaches the seeded stage the
run is frozen (SIGSTOP), and it is killed only if that checkpoint is still incomplete; a save that
finished first is let go (SIGCONT) and the next one is the target.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from models.adapters import AdapterError, checkpoint_complete, checkpoint_step, last_complete_checkpoint, resolve_adapter

# What is on disk when the kill lands; the Trainer writes a checkpoint in this order
# (adapter weights, optimizer and scheduler, RNG state, trainer_state.json last).
STAGES = {"dir": "", "weights": "adapter_model.safetensors", "optimizer": "optimizer.pt", "rng": "rng_state.pth"}


def kill_mid_save(proc: subprocess.Popen, checkpoints, first_step: int, stage: str, timeout: float = 900) -> int:
    """SIGKILL `proc` while it saves checkpoint-N, N >= first_step, once `stage` is on disk; returns N."""
    deadline = time.monotonic() + timeout
    # Checkpoints a previous kill cut short are not this run's saves: they count once the resumed
    # run has cleared them (it does before it trains).
    stale = {d.name for d in checkpoints.iterdir() if not checkpoint_complete(d)} if checkpoints.is_dir() else set()
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before a save at step >= {first_step} could be cut"
        names = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
        stale &= names
        newest = max((checkpoint_step(checkpoints / n) or 0 for n in names - stale), default=0)
        target = checkpoints / f"checkpoint-{newest}" / STAGES[stage]
        if newest >= first_step and target.exists():
            os.kill(proc.pid, signal.SIGSTOP)
            if not checkpoint_complete(checkpoints / f"checkpoint-{newest}"):
                proc.kill()
                proc.wait()
                return newest
            os.kill(proc.pid, signal.SIGCONT)  # this save finished first: aim at the next one
            first_step = newest + 1
        time.sleep(0.0005)
    raise AssertionError("no save was interrupted in time")


def _loss_steps(run) -> list[int]:
    with open(run / "loss.csv", newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r["loss"]]


def run_kill_chain(hf_model, persona_sft, tmp_path, crofter_home, seeds, max_steps, check_refusal=False) -> list:
    """Train `max_steps`, killed once per seed mid-save and resumed each time; returns the kills."""
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("learning_rate: 0.002\nbatch_size: 4\ngradient_checkpointing: false\nsave_steps: 1\n"
                      "eval_split: 0.0\nwarmup_ratio: 0.0\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "tune", "sft", "--base", str(hf_model), "--data", str(persona_sft),
           "--recipe", str(recipe), "--out", str(run), "--max-steps", str(max_steps), "--json"]
    env = {**os.environ, "CROFTER_HOME": str(crofter_home)}
    kills, resumed_from = [], 0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for seed in seeds:
        rng = random.Random(seed)
        stage = rng.choice(sorted(STAGES))
        # The first kill waits for checkpoint-1 to complete, so there is always one to resume from.
        cut = kill_mid_save(proc, run / "checkpoints", max(resumed_from, 1) + rng.randint(1, 2), stage)
        last = last_complete_checkpoint(run / "checkpoints")
        assert last is not None and resumed_from <= checkpoint_step(last) < cut
        assert not checkpoint_complete(run / "checkpoints" / f"checkpoint-{cut}")  # the kill did land mid-save
        kills.append({"seed": seed, "stage": stage, "cut": cut, "resume_from": checkpoint_step(last)})
        with pytest.raises(AdapterError, match=f"no adapter/.*last complete checkpoint is {re.escape(str(last))}:"):
            resolve_adapter(run)  # the killed run is no adapter yet, and the error says which checkpoint is
        resumed_from = checkpoint_step(last)
        if check_refusal:
            again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert again.returncode == 1 and "--resume" in again.stderr  # never silently restarts over a run
            check_refusal = False
        log = open(tmp_path / f"resume-{seed}.log", "w+")  # a file: a full pipe would stall the run
        proc = subprocess.Popen(cmd + ["--resume"], env=env, stdout=subprocess.PIPE, stderr=log)
    out, _ = proc.communicate(timeout=900)
    log.seek(0)
    assert proc.returncode == 0, log.read()[-2000:]
    assert json.loads(out)["steps"] == max_steps
    # The step count only grows: every step trained and logged once, in order, across all the kills.
    state = json.loads((run / "checkpoints" / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, max_steps + 1))
    assert _loss_steps(run) == list(range(1, max_steps + 1))
    # The cut checkpoints were cleared on resume; what is left is complete, and the adapter is there.
    left = [d for d in (run / "checkpoints").iterdir() if checkpoint_step(d)]
    assert left and all(checkpoint_complete(d) for d in left), [d.name for d in left]
    assert resolve_adapter(run, note=None) == run / "adapter"
    return kills


def test_killed_run_resumes_from_last_complete_checkpoint(hf_model, persona_sft, tmp_path, crofter_home):
    # One seeded kill in CI (the slow tier below runs twenty): a kill mid-save, the refusal to
    # restart over the run, and the resume that trains every step once.
    kills = run_kill_chain(hf_model, persona_sft, tmp_path, crofter_home, seeds=[0], max_steps=5,
                           check_refusal=True)
    assert len(kills) == 1


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("chain", range(4))
def test_killed_run_resumes_at_twenty_seeded_save_points(hf_model, persona_sft, tmp_path, crofter_home, chain):
    seeds = list(range(100 + 5 * chain, 105 + 5 * chain))  # 4 chains x 5 kills = 20 seeded kill points
    kills = run_kill_chain(hf_model, persona_sft, tmp_path, crofter_home, seeds=seeds, max_steps=16)
    print(json.dumps(kills))
    assert len(kills) == 5

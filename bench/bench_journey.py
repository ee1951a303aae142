"""A journey against its anchor: the same stages typed as separate crofter commands.

1. `crofter journey run J.yaml` in a fresh run folder (every stage and its evaluation).
2. The very commands that run recorded (its journey.json argv, evaluations included), replayed one
   after another as separate `crofter` processes into another folder: what a user would type.
   Goal: journey / separate <= 1.05.
3. The journey again with nothing changed: goal <= 5 s.

The journey is the persona example on SmolLM2-135M (dequantized once into the bench folder), with
its steps cut by --steps so a round takes minutes, not an hour:

    python bench/bench_journey.py [--steps 8] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOURNEY = ROOT / "finetune" / "configs" / "journeys" / "persona.yaml"


def crofter(args: list[str], env: dict) -> float:
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="SFT steps (DPO gets half)")
    ap.add_argument("--max-tokens", type=int, default=32, help="longest prompt-suite reply (config max_tokens)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp folder)")
    a = ap.parse_args()
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-journey-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CROFTER_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    base = work / "smollm2-hf"
    if not base.exists():
        crofter(["models", "dequantize", "smollm2-135m", "--out", str(base), "--no-register"], env)
    crofter(["config", "set", "max_tokens", str(a.max_tokens)], env)  # the suites' replies, the same on both sides
    sets = ["--set", f"base={base}", "--set", f"sft.max_steps={a.steps}", "--set", f"dpo.max_steps={max(1, a.steps // 2)}"]
    run = work / "journey-run"
    journey_s = crofter(["journey", "run", str(JOURNEY), "--out", str(run), *sets], env)
    state = json.loads((run / "journey.json").read_text())

    replay = work / "separate"
    commands = []
    for name in state["order"]:
        rec = state["stages"][name]
        if rec.get("argv"):
            commands.append([x.replace(str(run), str(replay)) for x in rec["argv"]])
        for cmd in _evals(rec, run, replay):
            commands.append(cmd)
    replay.mkdir(exist_ok=True)
    separate_s = sum(crofter(cmd, env) for cmd in commands)
    rerun_s = crofter(["journey", "run", str(JOURNEY), "--out", str(run), *sets], env)
    print(f"commands           {len(commands)} (stages and their evaluations)")
    print(f"journey run        {journey_s:8.1f} s")
    print(f"separate commands  {separate_s:8.1f} s")
    print(f"ratio              {journey_s / separate_s:8.3f}   (goal <= 1.05)")
    print(f"re-run, unchanged  {rerun_s:8.2f} s  (goal <= 5 s)")
    return 0


def _evals(rec: dict, run: Path, replay: Path) -> list[list[str]]:
    """The evaluation commands the journey ran after this stage (rebuilt from its plan)."""
    return [[x.replace(str(run), str(replay)) for x in cmd] for cmd in rec.get("eval_argv", [])]


if __name__ == "__main__":
    sys.exit(main())

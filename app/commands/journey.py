"""`crofter journey run | status`: a model's whole path from one YAML file (see app/journey/)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..errors import CLIError

EXAMPLES = Path(__file__).resolve().parents[2] / "finetune" / "configs" / "journeys"


def add_parser(sub) -> None:
    j = sub.add_parser(
        "journey", help="run a model's whole path (pretrain, SFT, DPO or reward+GRPO, merge, convert, quantize) as one command",
        description="A journey file lists stages (import, pretrain, sft, dpo, reward, grpo, merge, convert, quantize) and "
        "an evaluation run after each (held-out perplexity, benchmark tasks, a prompt suite, KL of the quant "
        "against F16). Each stage runs the crofter command a user would type; its output is keyed by its "
        "inputs and settings, so a re-run skips what is done, a changed stage re-runs with what follows, "
        "and a stage killed mid-training resumes from its last checkpoint. The run folder gets report.md "
        "and report.png; the final model is registered for `crofter chat -m NAME`.",
        epilog=f"Examples: {EXAMPLES}")
    jsub = j.add_subparsers(dest="journey_command", metavar="ACTION", required=True)
    for action, text in (("run", "run every stage that is not already done"),
                         ("status", "where a journey stands: each stage done, to run, changed or interrupted")):
        p = jsub.add_parser(action, help=text, description=text.capitalize() + ".")
        p.add_argument("journey", metavar="JOURNEY.yaml|RUN", help="a journey file (or, for status, its run folder)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a journey key, e.g. --set base=HF_DIR --set sft.max_steps=10 (repeatable)")
        p.add_argument("--out", metavar="RUN", help="the run folder (default: <data dir>/journeys/<file stem>)")
        p.add_argument("--json", action="store_true", help="print the state as JSON")
        if action == "run":
            p.add_argument("--dry-run", action="store_true", help="print the plan (what runs, what is skipped) and stop")
    from .journey_diff import add_diff_parser  # argparse only: torch waits for run_diff

    add_diff_parser(jsub)


def _load(args):
    from ..journey.plan import load_journey
    from ..journey.runner import STATE, default_run_dir, load_state

    target = Path(args.journey).expanduser()
    sets = list(args.set)
    if target.is_dir():  # a run folder: read its journey file back from the state
        state = load_state(target)
        if not state.get("journey"):
            raise CLIError(f"{target}: not a journey run folder (no {STATE})")
        sets[:0] = state.get("sets", [])
        return _warned(load_journey(state["journey"], sets)), target, state, sets
    journey = _warned(load_journey(target, sets))
    run_dir = Path(args.out).expanduser() if args.out else default_run_dir(journey)
    return journey, run_dir, load_state(run_dir), sets


def _warned(journey):
    for line in journey.warnings:
        print(f"crofter: warning: {line}", file=sys.stderr)
    return journey


def run(args) -> int:
    if args.journey_command == "diff":
        from .journey_diff import run_diff

        return run_diff(args)
    from ..journey.plan import JourneyError

    try:
        journey, run_dir, state, sets = _load(args)
        if args.journey_command == "status" or getattr(args, "dry_run", False):
            return _status(args, journey, run_dir, state)
        from ..journey.runner import Runner

        runner = Runner(journey, run_dir, quiet=args.json, sets=sets)
        state = runner.run()
    except JourneyError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(state, indent=2, default=str))
    else:
        from ..journey.report import changes

        print("\n".join(changes(state)) or "(no figures)")
        print(f"report: {run_dir / 'report.md'}", file=sys.stderr)
    return 0


WORDS = {"done": "done", "run": "to run", "resume": "interrupted: resumes from its last checkpoint",
         "changed": "changed since the last run: re-runs"}


def _status(args, journey, run_dir: Path, state: dict) -> int:
    from ..journey.runner import missing_outputs, plan

    steps, _ = plan(journey, run_dir, state, write=False)
    saved = state.get("stages", {})
    rows = []
    for p in steps:
        rec = saved.get(p.name, {})
        status = p.status
        if status != "done" and rec.get("status") == "failed" and rec.get("key") == p.key:
            status = "failed"
        fresh = rec.get("eval_key") == p.eval_key and not missing_outputs(p.eval_cmds)
        eval_state = "" if not p.eval_cmds else ("evaluated" if fresh else "to evaluate")
        rows.append({"stage": p.name, "status": status, "key": p.key, "seconds": rec.get("seconds"),
                     "eval": eval_state, "command": ["crofter", *p.step.argv] if p.step else None})
    if args.json:
        print(json.dumps({"journey": str(journey.path), "run": str(run_dir), "stages": rows}, indent=2))
        return 0
    print(f"journey {journey.name}: {journey.path}  (run folder {run_dir})")
    for r in rows:
        secs = f"{r['seconds']:.0f} s" if r["seconds"] is not None else ""
        what = WORDS.get(r["status"], r["status"])
        print(f"  {r['stage']:<12} {what:<18} {secs:>7}  {r['eval']}")
        if getattr(args, "dry_run", False) and r["command"] and r["status"] != "done":
            print(f"      {shlex.join(r['command'])}")
    todo = sum(r["status"] != "done" for r in rows)
    print(f"{todo} of {len(rows)} steps to run" if todo else "everything is done", file=sys.stderr)
    return 0

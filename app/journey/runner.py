"""Running a journey: each stage that is not already done, as a crofter child process, then its
evaluation; the state is saved after every step, so a kill loses at most the step under way.

RUN/journey.json holds, per stage, its key, its status (done, running, failed), what its command
printed (--json), its seconds and its evaluation rows. A stage is skipped when its key matches
and its outputs exist; a stage that was running when killed resumes from its last complete
checkpoint (training) or starts again (the others write their outputs atomically).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import keys
from .plan import Journey, JourneyError, Stage
from .stages import TUNE_RESUMABLE, Chain, Step, base_gguf_step, build, evaluations

STATE = "journey.json"


def default_run_dir(journey: Journey) -> Path:
    return run_dir_for(journey.path)


def run_dir_for(journey_file: Path) -> Path:
    """Where a journey file runs without --out: <data dir>/journeys/<its stem>."""
    from models import paths

    return paths.data_dir() / "journeys" / Path(journey_file).stem


def load_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise JourneyError(f"{run_dir / STATE}: unreadable ({exc}); move it away to start the journey afresh") from None


@dataclass
class Planned:
    stage: Stage | None        # None: the base model's evaluation
    name: str                  # folder name: 00-base, 01-sft, ...
    step: Step | None
    key: str
    eval_cmds: list = field(default_factory=list)
    eval_key: str = ""
    status: str = "run"        # done | run | resume | changed


def reward_code(spec: str | None) -> Path | None:
    """The file a python:MODULE:FUNC reward lives in, so that editing the function re-runs GRPO."""
    if not spec or not spec.startswith("python:"):
        return None
    module = spec[len("python:"):].rpartition(":")[0]
    if module.endswith(".py"):
        path = Path(module).expanduser()
        return path if path.is_file() else None
    import importlib.util
    import sys

    sys.path.insert(0, str(Path.cwd()))
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    finally:
        sys.path.remove(str(Path.cwd()))
    return Path(found.origin) if found is not None and found.origin and Path(found.origin).is_file() else None


def plan(journey: Journey, run_dir: Path, state: dict, write: bool = True) -> tuple[list[Planned], Chain]:
    """Every step with its key and whether it must run; `write=False` writes nothing (dry run, status)."""
    chain = Chain(base=journey.base_path)
    out: list[Planned] = []
    prev = keys.key(keys.tool_version(), keys.model_key(journey.base_path) if journey.base_path else "import")
    saved = state.get("stages", {})
    ev_key_part = journey.eval
    if journey.base_path is not None and journey.eval:  # the starting point, measured
        step = base_gguf_step(run_dir, chain) if journey.eval.get("prompts") else None
        p = Planned(None, "00-base", step, prev)
        p.eval_cmds = evaluations("base", journey, chain, run_dir / "00-base")
        out.append(p)
    for s in journey.stages:
        step = build(s, run_dir, chain, journey, write)
        cfg = {k: v for k, v in s.cfg.items() if not (k == "data" and v == "chats")}
        extra = journey.eval.get("text") if s.kind == "quantize" else reward_code(s.cfg.get("reward")) \
            if s.kind == "grpo" else None
        prev = keys.key(prev, s.kind, cfg, step.data, extra)
        if step.data is not None and not write and step.data.parent != run_dir / "data":
            step.data.unlink(missing_ok=True)  # a dry run's temporary export
        p = Planned(s, s.folder_name, step, prev)
        p.eval_cmds = evaluations(s.kind, journey, chain, step.folder)
        out.append(p)
    for p in out:
        # New commands are evaluated again; the run folder's spelling (or a move) is not a change.
        cmds = [[x.replace(str(run_dir), "{RUN}") for x in c] for c in p.eval_cmds]
        p.eval_key = keys.key(p.key, ev_key_part, cmds) if p.eval_cmds else ""
        rec = saved.get(p.name, {})
        done = rec.get("key") == p.key and rec.get("status") == "done" and all(
            Path(v).exists() for v in rec.get("outputs", {}).values())
        if done:
            p.status = "done"
        elif rec.get("key") == p.key and p.stage is not None and p.stage.kind in TUNE_RESUMABLE and _checkpoint(p):
            p.status = "resume"
        elif rec:
            p.status = "changed"
    return out, chain


def _checkpoint(p: Planned) -> Path | None:
    from models.adapters import last_complete_checkpoint

    folder = p.step.folder / "checkpoints" if p.step else None
    return last_complete_checkpoint(folder) if folder is not None and folder.is_dir() else None


@contextlib.contextmanager
def run_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JourneyError(f"{run_dir}: another `crofter journey run` is working in this folder") from None
        yield
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the journey dies, so a killed journey leaves no stage running."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Runner:
    def __init__(self, journey: Journey, run_dir: Path, *, quiet: bool = False, sets: list[str] | None = None):
        self.journey, self.run_dir, self.quiet, self.sets = journey, run_dir, quiet, list(sets or [])
        self.state: dict = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"journey: {text}", file=sys.stderr, flush=True)

    def save(self) -> None:
        from models.atomic import write_text

        write_text(self.run_dir / STATE, json.dumps(self.state, indent=2, default=str))

    def crofter(self, argv: list[str], what: str) -> dict | list:
        """Run `crofter ARGV` (stderr to the terminal: its own progress bars), parse its --json stdout."""
        cmd = [sys.executable, "-m", "app.cli", *argv]
        self.say(f"  $ crofter {shlex.join(argv)}")
        root = str(Path(__file__).resolve().parents[2])  # crofter runs from its source tree too, not only installed
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath})
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise JourneyError(f"{what} failed (crofter exited {proc.returncode}; its error is above). Fix it and run the "
                               f"journey again: finished stages are kept")
        text = out.strip()
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return json.loads(text.splitlines()[-1])

    def run(self) -> dict:
        with run_lock(self.run_dir):
            self.state = load_state(self.run_dir)
            steps, chain = plan(self.journey, self.run_dir, self.state)
            self._check_name(chain)
            self.state.update(journey=str(self.journey.path.resolve()), name=self.journey.name,
                              started=time.time(), order=[p.name for p in steps], sets=self.sets)
            self.state.setdefault("stages", {})
            t0, n = time.monotonic(), len(steps)
            for i, p in enumerate(steps, 1):
                self._stage(i, n, p, steps)
            self.state["registered_as"] = self._register(chain)
            self.state["seconds"] = round(time.monotonic() - t0, 2)
            self.save()
            from .report import write_report

            write_report(self.run_dir, self.state)
            return self.state

    def _stage(self, i: int, n: int, p: Planned, steps: list[Planned]) -> None:
        label = f"[{i}/{n}] {p.name}"
        rec = self.state["stages"].get(p.name, {})
        if p.status == "done":
            self.say(f"{label}: up to date, skipped")
        elif p.step is not None:
            eta = self._eta(steps[i - 1:])
            self.say(f"{label}: {'resuming' if p.status == 'resume' else 'running'}" + (f" (about {eta} left, from the last run)" if eta else ""))
            if p.status != "resume" and p.step.folder.exists() and p.name != "00-base":
                shutil.rmtree(p.step.folder)
            argv = p.step.argv + (["--resume"] if p.status == "resume" else [])
            rec = {"kind": p.stage.kind if p.stage else "base", "key": p.key, "status": "running",
                   "outputs": {k: str(v) for k, v in p.step.outputs.items()}, "argv": argv,
                   "last_seconds": rec.get("seconds")}
            if p.status == "resume":
                rec["resumed_from"] = _checkpoint(p).name
            self.state["stages"][p.name] = rec
            self.save()
            t = time.monotonic()
            try:
                rec["summary"] = self.crofter(argv, f"stage {p.name}")
            except JourneyError:
                rec["status"] = "failed"
                self.save()
                raise
            rec.update(status="done", seconds=round(time.monotonic() - t, 2))
            self.save()
            self.say(f"{label}: done in {rec['seconds']:.0f} s{_brief(rec['summary'])}")
        else:
            rec = {"kind": "base", "key": p.key, "status": "done", "outputs": {}}
            self.state["stages"][p.name] = rec
        if p.eval_cmds and (rec.get("eval_key") != p.eval_key or missing_outputs(p.eval_cmds)):
            t, rows = time.monotonic(), []
            self.say(f"{label}: evaluating")
            for cmd in p.eval_cmds:
                got = self.crofter(cmd, f"the evaluation of {p.name}")
                rows += got if isinstance(got, list) else []
            rec.update(eval=rows, eval_key=p.eval_key, eval_argv=p.eval_cmds,
                       eval_seconds=round(time.monotonic() - t, 2))
            self.save()

    def _eta(self, rest: list[Planned]) -> str:
        known = [self.state["stages"].get(p.name, {}).get("seconds") or self.state["stages"].get(p.name, {}).get("last_seconds")
                 for p in rest if p.status != "done"]
        if not known or any(s is None for s in known):
            return ""
        total = sum(known)
        return f"{total / 60:.0f} min" if total >= 90 else f"{total:.0f} s"

    def _check_name(self, chain: Chain) -> None:
        from models.registry import ModelError, Registry

        if chain.final_model() is None:
            return
        try:
            entry = Registry().get(self.journey.name)
        except ModelError:
            return
        if entry.source != "journey":
            raise JourneyError(f"{self.journey.path}: name: {self.journey.name!r} is already a model in the store "
                               f"({entry.path}); choose another name for this journey's model")

    def _register(self, chain: Chain) -> str | None:
        from models.registry import Registry

        final = chain.final_model()
        if final is None:
            return None
        Registry().add(final, self.journey.name, source="journey")
        self.say(f"registered {final.name} as {self.journey.name!r}: crofter chat -m {self.journey.name}")
        return self.journey.name


def missing_outputs(cmds: list[list[str]]) -> bool:
    """Whether a file an evaluation makes for later ones (a base's GGUF, an adapter's) is gone."""
    return any(not Path(c[c.index("--out") + 1]).exists() for c in cmds if "--out" in c[:-1])


def _brief(summary) -> str:
    if not isinstance(summary, dict):
        return ""
    bits = []
    if summary.get("eval_loss") is not None:
        bits.append(f"eval loss {summary['eval_loss']:.3f}")
    if summary.get("size_bytes"):
        bits.append(f"{summary['size_bytes'] / 1e6:.0f} MB")
    return f" ({', '.join(bits)})" if bits else ""

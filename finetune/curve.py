"""The loss curve of a run: every Trainer log line appended to loss.csv, loss.png redrawn at the end.

DPO runs also plot chosen and rejected rewards side by side: a chosen reward that falls
while the margin grows (TRL #800) should be visible, not buried in a margin. Reward-model runs
plot pair accuracy and margin; GRPO runs plot the mean reward and the KL to the reference.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable


class CurveLogger:
    """A TrainerCallback that appends every log line to loss.csv and redraws loss.png at the end."""

    COLUMNS = ["step", "epoch", "loss", "eval_loss", "learning_rate", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "eval_rewards/chosen", "eval_rewards/rejected",
               "eval_rewards/margins", "eval_rewards/accuracies", "accuracy", "margin", "eval_accuracy",
               "eval_margin", "reward", "reward_std", "kl"]
    # The second panel, by the kind of run the rows show: (a column that marks it, title, columns).
    PANELS = [("rewards/margins", "DPO rewards (chosen must not fall unnoticed)",
               ("rewards/chosen", "rewards/rejected", "rewards/margins")),
              ("reward", "GRPO: mean reward and KL to the reference", ("reward", "kl")),
              ("accuracy", "reward model: pair accuracy and margin", ("accuracy", "eval_accuracy", "margin", "eval_margin"))]

    def __init__(self, run_dir: Path, on_log: Callable[[dict], None] | None = None):
        from transformers import TrainerCallback

        self.csv = run_dir / "loss.csv"
        self.png = run_dir / "loss.png"
        self.on_log = on_log
        self.last: dict = {}
        self.last_eval: dict = {}
        outer = self

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                outer.log(state.global_step, logs or {})

        self.callback = _CB()

    def log(self, step: int, logs: dict) -> None:
        row = {"step": step, **{k: logs.get(k) for k in self.COLUMNS if k != "step"}}
        if all(row[k] is None for k in self.COLUMNS if k not in ("step", "epoch", "learning_rate")):
            return
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
        self.last.update({k: v for k, v in logs.items() if not k.startswith("eval_")})
        self.last_eval.update({k: v for k, v in logs.items() if k.startswith("eval_")})
        if self.on_log:
            self.on_log(logs)

    @staticmethod
    def truncate(run_dir: Path, step: int) -> None:
        """Drop the rows logged after `step` (a resumed run logs them again from its checkpoint)."""
        path = run_dir / "loss.csv"
        if not path.exists():
            return
        import io

        from models.atomic import write_text

        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, CurveLogger.COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_text(path, buf.getvalue())

    def plot(self) -> None:
        if not self.csv.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.csv) as fh:
            rows = list(csv.DictReader(fh))
        panel = next((p for p in self.PANELS if any(r.get(p[0]) for r in rows)), None)
        fig, axes = plt.subplots(1, 2 if panel else 1, figsize=(10, 4), squeeze=False)
        for key, style in (("loss", "-"), ("eval_loss", "o-")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
            if pts:
                axes[0][0].plot(*zip(*pts), style, label=key)
        axes[0][0].set_xlabel("step")
        axes[0][0].set_title("loss")
        axes[0][0].legend()
        if panel:
            for key in panel[2]:
                pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
                if pts:
                    axes[0][1].plot(*zip(*pts), "o-" if key.startswith("eval_") else "-", label=key)
            axes[0][1].set_title(panel[1])
            axes[0][1].legend()
        fig.tight_layout()
        tmp = self.png.with_suffix(".png.partial")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.png)

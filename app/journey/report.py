"""RUN/report.md and RUN/report.png: every stage's figures, and what each stage changed.

One metric per panel and one point per stage in the PNG; in the Markdown a table (stages down,
metrics across) and lines such as "sft: held-out PPL 18.2 -> 9.1".
"""
from __future__ import annotations

import math
from pathlib import Path

NAMES = {("perplexity", "ppl"): "held-out PPL", ("perplexity", "kld"): "KLD vs F16",
         ("perplexity", "same_top"): "same top token", ("prompts", "pass_rate"): "prompt suite"}
LOWER_BETTER = ("PPL", "perplexity", "KLD", "loss", "MB")


def stage_metrics(rec: dict) -> dict[str, tuple[float, int]]:
    """{metric label: (value, n)} of one stage: its evaluation rows, then its command's own figures."""
    out: dict[str, tuple[float, int]] = {}
    for r in rec.get("eval") or []:
        if ":" in r["metric"]:
            continue  # per-check-kind pass rates: in the eval's own output
        label = NAMES.get((r["suite"], r["metric"])) or f"{r['task']} {r['metric']}"
        out[label] = (float(r["value"]), int(r.get("n") or 0))
    s = rec.get("summary")
    if isinstance(s, dict):
        if s.get("eval_loss") is not None and rec.get("kind") in ("pretrain", "sft", "dpo", "reward", "grpo"):
            out[f"{rec['kind']} eval loss"] = (float(s["eval_loss"]), 0)
        for k, v in (s.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and (k == "kl" or any(w in k for w in ("accurac", "margin", "reward", "perplexity"))) \
                    and not any(w in k for w in ("/chosen", "/rejected", "min_reward", "max_reward", "reward_std")):
                out[f"{rec['kind']} {k.removeprefix('eval_')}"] = (float(v), 0)
        size = s.get("size_bytes")
        if size is None and rec.get("kind") in ("convert", "quantize"):
            path = Path(s.get("path") or "")
            size = path.stat().st_size if path.is_file() else None
        if size:
            out["file MB"] = (size / 1e6, 0)
    return out


def _fmt(label: str, value: float, n: int) -> str:
    if label == "prompt suite" and n:
        return f"{round(value * n)}/{n}"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _rows(state: dict) -> list[tuple[str, dict]]:
    stages = state.get("stages", {})
    return [(name, stage_metrics(stages[name])) for name in state.get("order", sorted(stages)) if name in stages]


def changes(state: dict) -> list[str]:
    """'STAGE: METRIC A -> B' against the last earlier stage that had the metric."""
    last: dict[str, tuple[str, float, int]] = {}
    lines = []
    for name, metrics in _rows(state):
        bits = []
        for label, (v, n) in metrics.items():
            if label in last:
                _, pv, pn = last[label]
                bits.append(f"{label} {_fmt(label, pv, pn)} -> {_fmt(label, v, n)}")
            elif name != "00-base":
                bits.append(f"{label} {_fmt(label, v, n)}")
            last[label] = (name, v, n)
        if bits:
            lines.append(f"{name}: " + "; ".join(bits))
    return lines


def markdown(state: dict) -> str:
    rows = _rows(state)
    labels = list(dict.fromkeys(label for _, m in rows for label in m))
    stages = state.get("stages", {})
    out = [f"# Journey {state.get('name', '')}", "",
           f"- journey file: `{state.get('journey', '')}`",
           f"- total time: {state.get('seconds', 0):.0f} s (this run; skipped stages cost nothing)"]
    if state.get("registered_as"):
        out.append(f"- model: `crofter chat -m {state['registered_as']}`")
    out += ["", "## What each stage changed", ""] + [f"- {line}" for line in changes(state) or ["(no figures)"]]
    out += ["", "## Every figure", "", "| stage | seconds | " + " | ".join(labels) + " |",
            "|---|---:|" + "---:|" * len(labels)]
    for name, m in rows:
        secs = stages[name].get("seconds")
        cells = [_fmt(label, *m[label]) if label in m else "" for label in labels]
        out.append(f"| {name} | {'' if secs is None else f'{secs:.0f}'} | " + " | ".join(cells) + " |")
    out += ["", "Lower is better for " + ", ".join(LOWER_BETTER) + "; higher for pass rates, accuracies and rewards.",
            "![every metric, one point per stage](report.png)", ""]
    return "\n".join(out)


def plot(state: dict, path: Path) -> bool:
    """One panel per metric, one point per stage; False when there is nothing to draw."""
    rows = _rows(state)
    labels = list(dict.fromkeys(label for _, m in rows for label in m))
    if not labels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(labels))
    nrows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        pts = [(name, m[label][0]) for name, m in rows if label in m]
        ax.plot(range(len(pts)), [v for _, v in pts], marker="o")
        ax.set_xticks(range(len(pts)), [n.split("-", 1)[-1] for n, _ in pts], rotation=30, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    from models.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def write_report(run_dir: Path, state: dict) -> Path:
    from models.atomic import write_text

    path = run_dir / "report.md"
    plot(state, run_dir / "report.png")
    write_text(path, markdown(state))
    return path

"""Models side by side: one table of every metric, deltas against the first model, significance.

A difference is marked significant when both values carry a standard error and
``|delta| > 2 * sqrt(se_a**2 + se_b**2)`` (two standard errors of the difference of two
independent estimates, about 95%). A value without a stderr is never marked; a metric a
model was not measured on is an empty cell, never a zero.

    >>> t = compare([("base", [Row("base", "tasks", "arc", "acc", 0.30, 0.02, 500)]),
    ...              ("sft", [Row("sft", "tasks", "arc", "acc", 0.60, 0.02, 500)])])
    >>> t.rows[0].cells[1].significant
    True

Lower is better for perplexity, KL divergence, seconds, bytes and memory; higher for the rest
(acc, pass_rate, recall, mrr, tok/s): `lower_is_better` holds that table, and the rendered
delta is coloured by whether it is a gain, not by its sign.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .rows import SUITES, EvalError, Row

# Metric names (lower-cased, lm-eval's ",filter" dropped) that are one of these, start with one of
# the prefixes or contain one of the words get better as they fall. Everything else (acc, acc_norm,
# pass_rate, recall@5, mrr, same_top, decode_tok_s) gets better as it rises.
LOWER_EXACT = ("ter", "wer", "cer", "kl")
LOWER_PREFIXES = ("ppl", "perplexity", "kld", "kl_", "mean_kl", "nll", "loss", "bits_per_byte")
LOWER_WORDS = ("perplexity", "seconds", "bytes", "memory", "peak_mem", "peak_rss", "latency", "ttft")
MARK = "*"
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def lower_is_better(metric: str) -> bool:
    """True for metrics that improve as they fall (ppl, kld, load_seconds, file_bytes, peak_memory_mib)."""
    m = metric.lower().split(",")[0]  # lm-eval names carry a filter: "exact_match,strict-match"
    return m in LOWER_EXACT or m.startswith(LOWER_PREFIXES) or any(w in m for w in LOWER_WORDS)


@dataclass(frozen=True)
class Cell:
    value: float
    stderr: float | None
    n: int
    delta: float | None     # value - baseline value; None in the baseline column or without a baseline
    significant: bool       # |delta| > 2 * sqrt(se_a^2 + se_b^2), both stderrs known


@dataclass(frozen=True)
class TableRow:
    suite: str
    task: str
    metric: str
    cells: tuple[Cell | None, ...]   # one per model, in the table's order; None: not measured

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)


@dataclass(frozen=True)
class Table:
    labels: tuple[str, ...]          # the models, baseline first
    rows: tuple[TableRow, ...]

    @property
    def baseline(self) -> str:
        return self.labels[0]


def _known(se: float | None) -> bool:
    return se is not None and math.isfinite(se)


def significant(a: Cell | Row, b: Cell | Row) -> bool:
    """Whether b differs from a by more than two standard errors of the difference."""
    if not (_known(a.stderr) and _known(b.stderr)):
        return False
    delta = b.value - a.value
    return math.isfinite(delta) and abs(delta) > 2.0 * math.sqrt(a.stderr ** 2 + b.stderr ** 2)


def _order(key: tuple[str, str, str]) -> tuple:
    suite, task, metric = key
    return (SUITES.index(suite) if suite in SUITES else len(SUITES), suite, task, metric)


def compare(columns: Sequence[tuple[str, Iterable[Row]]]) -> Table:
    """One table of [(label, rows)], the first column the baseline; rows need suite, task, metric,
    value, stderr and n (a `Row`, a `StoredRow`). Table rows run in SUITES order, then task, metric."""
    if not columns:
        raise EvalError("nothing to compare: give at least one model")
    labels = [label for label, _ in columns]
    if len(set(labels)) != len(labels):
        twice = next(x for x in labels if labels.count(x) > 1)
        raise EvalError(f"model {twice!r} is given twice")
    per: list[dict[tuple[str, str, str], Row]] = []
    for label, rows in columns:
        got: dict[tuple[str, str, str], Row] = {}
        for r in rows:
            key = (r.suite, r.task, r.metric)
            if key in got:
                raise EvalError(f"{label}: two values for {' / '.join(key)}")
            got[key] = r
        per.append(got)
    keys = sorted({k for got in per for k in got}, key=_order)
    out = []
    for key in keys:
        base = per[0].get(key)
        cells: list[Cell | None] = []
        for i, got in enumerate(per):
            r = got.get(key)
            if r is None:
                cells.append(None)
                continue
            has_base = i > 0 and base is not None
            cells.append(Cell(float(r.value), None if r.stderr is None else float(r.stderr), int(r.n),
                              r.value - base.value if has_base else None, has_base and significant(base, r)))
        out.append(TableRow(*key, tuple(cells)))
    return Table(tuple(labels), tuple(out))


def from_store(store, names: Sequence[str]) -> Table:
    """`compare` of each name's newest stored values (`ResultStore.latest`: a name or a hash prefix)."""
    columns = []
    for name in names:
        rows = store.latest(name)
        if not rows:
            known = store.models()
            listing = ", ".join(f"{m.name} ({m.model_hash[:8]})" for m in known) or "none yet: run crofter eval MODEL"
            raise EvalError(f"no stored results for {name!r}; known models: {listing}")
        columns.append((name, rows))
    return compare(columns)


# -- output --------------------------------------------------------------------------------

def _decimals(value: float) -> int:
    a = abs(value)
    if not math.isfinite(a) or a >= 1000:
        return 0
    return 1 if a >= 100 else 2 if a >= 10 else 3 if a >= 1 else 4


def fmt(value: float, decimals: int | None = None, sign: bool = False) -> str:
    d = _decimals(value) if decimals is None else decimals
    return f"{value:{'+' if sign else ''},.{d}f}"


def cell_text(c: Cell | None) -> str:
    """'0.3012 ± 0.0205', or '' for a cell that was not measured."""
    if c is None:
        return ""
    d = _decimals(c.value)
    return fmt(c.value, d) + (f" ± {fmt(c.stderr, d)}" if _known(c.stderr) else "")


def delta_text(c: Cell | None, base: Cell | None) -> str:
    """'+0.3000 (+100.0%) *' (the marker when significant); '' without a delta."""
    if c is None or c.delta is None:
        return ""
    text = fmt(c.delta, max(_decimals(c.value), _decimals(base.value) if base else 0), sign=True)
    if base is not None and base.value and math.isfinite(c.delta):
        text += f" ({c.delta / abs(base.value) * 100:+.1f}%)"
    return text + (f" {MARK}" if c.significant else "")


def gain(row: TableRow, c: Cell | None) -> bool | None:
    """True when c's delta is an improvement, False a loss, None for no delta or no change."""
    if c is None or not c.delta:
        return None
    return (c.delta < 0) == row.lower_is_better


def legend(table: Table) -> str:
    return (f"Δ: difference from {table.baseline}; {MARK}: |Δ| > 2 standard errors of the difference "
            f"(only where both have a stderr); ↓ lower is better, ↑ higher is better; "
            "green a gain, red a loss; empty: not measured")


def render(table: Table):
    """A rich Table: suite, task, metric (↓/↑), value ± stderr per model, Δ per later model.

    Every cell is a rich Text, so a task or model name is shown literally, never as markup."""
    from rich.table import Table as RichTable
    from rich.text import Text

    out = RichTable(caption=Text(legend(table)), caption_justify="left")
    for name in ("suite", "task", "metric"):
        out.add_column(Text(name))
    for label in table.labels:
        out.add_column(Text(label), justify="right")
    for label in table.labels[1:]:
        out.add_column(Text(f"Δ {label}"), justify="right")
    for row in table.rows:
        base = row.cells[0]
        deltas = []
        for c in row.cells[1:]:
            won = gain(row, c)
            style = "" if won is None else ("green" if won else "red") + (" bold" if c.significant else " dim")
            deltas.append(Text(delta_text(c, base), style=style))
        arrow = "↓" if row.lower_is_better else "↑"
        out.add_row(Text(row.suite), Text(row.task), Text(f"{row.metric} {arrow}"),
                    *(Text(cell_text(c)) for c in row.cells), *deltas)
    return out


def to_text(table: Table, width: int = 160) -> str:
    """`render` as plain text (no colour), for logs and tests."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(render(table))
    return console.file.getvalue()


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None  # strict JSON has no inf or nan


def table_json(table: Table) -> list[dict]:
    """One dict per table row: suite, task, metric, lower_is_better, and under "models" every
    model (baseline first) -> {value, stderr, n, delta, significant}, or None when not measured."""
    out = []
    for row in table.rows:
        models = {}
        for label, c in zip(table.labels, row.cells):
            models[label] = None if c is None else {
                "value": _num(c.value), "stderr": _num(c.stderr), "n": c.n, "delta": _num(c.delta),
                "significant": c.significant}
        out.append({"suite": row.suite, "task": row.task, "metric": row.metric,
                    "lower_is_better": row.lower_is_better, "baseline": table.baseline, "models": models})
    return out


def _plain(text: str) -> str:
    """Text as matplotlib shows it literally: a `$` would start mathtext (and may fail to parse)."""
    return text.replace("$", r"\$")


def plot(table: Table, path: str | os.PathLike, *, dpi: int = 120) -> None:
    """Bars per model with stderr error bars, one subplot per (suite, metric) with its tasks
    along the x axis; significant deltas get the marker above their bar. The suffix of `path`
    (.png, .svg, .pdf) picks the format; the file appears only when complete."""
    from pathlib import Path

    from models.atomic import atomic_path

    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise EvalError(f"{path}: cannot plot to {path.suffix or 'a file without a suffix'}: use .png, .svg or .pdf")
    if not table.rows:
        raise EvalError(f"{path}: nothing to plot, the table is empty")
    # Figure without pyplot: no global backend state, the Agg canvas comes with savefig.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    groups: dict[tuple[str, str], list[TableRow]] = {}
    for row in table.rows:
        groups.setdefault((row.suite, row.metric), []).append(row)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    width = 0.8 / len(table.labels)
    colours = [f"C{i % 10}" for i in range(len(table.labels))]
    for ax, ((suite, metric), rows) in zip(axes, groups.items()):
        for m, label in enumerate(table.labels):
            xs, ys, errs = [], [], []
            for x, row in enumerate(rows):
                c = row.cells[m]
                if c is None or not math.isfinite(c.value):
                    continue  # not measured: no bar, not a zero
                xs.append(x - 0.4 + width * (m + 0.5))
                ys.append(c.value)
                errs.append(c.stderr if _known(c.stderr) else math.nan)  # nan: no error bar drawn
                if c.significant:
                    ax.annotate(MARK, (xs[-1], c.value + c.stderr), ha="center", va="bottom")
            if xs:
                ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colours[m])
        ax.set_xticks(range(len(rows)), [_plain(r.task) for r in rows], rotation=20 if len(rows) > 3 else 0)
        ax.set_title(_plain(f"{suite}: {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)"),
                     fontsize="medium")
        ax.margins(y=0.15)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    handles = [Patch(color=colours[m], label=_plain(label)) for m, label in enumerate(table.labels)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
               title=_plain(f"{MARK}: differs from {table.baseline} by > 2 standard errors"))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=kind, dpi=dpi)

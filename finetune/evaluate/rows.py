"""The unit every evaluation produces: one metric of one model on one task."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

SUITES = ("perplexity", "tasks", "prompts", "retrieval", "speed")


class EvalError(ValueError):
    """Bad evaluation input (a task file, a suite, a text): the message names the file and line."""


@dataclass(frozen=True)
class Row:
    model: str     # the name the user gave (store name, path or folder)
    suite: str     # one of SUITES
    task: str      # task, suite file stem, text name, or "speed"
    metric: str    # e.g. "ppl", "acc", "pass_rate", "recall@5", "decode_tok_s"
    value: float
    stderr: float | None = None
    n: int = 0     # items (tokens for perplexity) the value is computed over

    def as_dict(self) -> dict:
        return asdict(self)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation over sqrt(n), as lm-eval's `mean_stderr` (for 0/1 outcomes,
    sqrt(p(1-p)/(n-1))). None for fewer than two values: one says nothing about spread, and
    0 would claim a certainty it does not have."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def read_input(path: Path, what: str, max_bytes: int) -> str:
    """The UTF-8 text of an input file (a BOM is dropped); errors name the file and line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EvalError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise EvalError(f"{path}: the {what} is {len(data)} bytes; the most read is {max_bytes}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EvalError(f"{path}:{line}: not UTF-8 text") from None

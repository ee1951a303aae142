"""The unit every evaluation produces: one metric of one model on one task."""
from __future__ import annotations

from dataclasses import asdict, dataclass

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

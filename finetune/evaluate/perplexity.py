"""Perplexity of a text, scored the way llama.cpp's perplexity tool scores it, and the
KL divergence and same-top-token rate against a reference model on the same windows.

The token ids are cut into consecutive windows of `n_ctx` tokens; when the model
puts a BOS first, the window's first token is replaced by it. Only the second half
of each window is scored, so every scored token sees at least n_ctx/2 tokens of
context. A GGUF (llama.cpp) and an HF checkpoint (torch) of the same model score
the same windows, so a converted model's perplexity is comparable with its
checkpoint's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .rows import EvalError, Row
from .scorer import log_softmax


@dataclass
class Perplexity:
    tokens: int = 0            # tokens scored
    windows: int = 0
    nll: list = field(default_factory=list)      # per scored token, nats
    kld: list = field(default_factory=list)      # per scored token, vs the reference
    same_top: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(float(np.mean(self.nll)))

    @property
    def ppl_stderr(self) -> float:
        """Delta method on the mean negative log-likelihood (as llama-perplexity reports)."""
        n = len(self.nll)
        return self.ppl * float(np.std(self.nll, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")

    def rows(self, model: str, task: str) -> list[Row]:
        out = [Row(model, "perplexity", task, "ppl", self.ppl, self.ppl_stderr, self.tokens)]
        if self.kld:
            n = len(self.kld)
            out.append(Row(model, "perplexity", task, "kld", float(np.mean(self.kld)),
                           float(np.std(self.kld, ddof=1)) / math.sqrt(n) if n > 1 else None, n))
            p = self.same_top / n
            out.append(Row(model, "perplexity", task, "same_top", p,
                           math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None, n))
        return out


def windows(ids: list[int], n_ctx: int, bos_id: int | None) -> list[list[int]]:
    if n_ctx < 8:
        raise EvalError(f"--ctx {n_ctx}: perplexity windows need at least 8 tokens")
    if len(ids) < n_ctx:
        raise EvalError(f"the text has {len(ids)} tokens; perplexity needs at least {n_ctx} (--ctx)")
    out = []
    for start in range(0, len(ids) - n_ctx + 1, n_ctx):
        w = list(ids[start:start + n_ctx])
        if bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


def perplexity(scorer, text: str, n_ctx: int = 512, reference=None, max_windows: int | None = None,
               on_window: Callable[[int, int], None] | None = None) -> Perplexity:
    """Score `text` with `scorer` (see scorer.py); with `reference`, also KL(reference || model)."""
    if n_ctx > scorer.n_ctx:
        raise EvalError(f"--ctx {n_ctx} is more than the model's loaded context {scorer.n_ctx}")
    ids = scorer.tokenize(text)
    if reference is not None:
        ref_ids = reference.tokenize(text)
        if ref_ids != ids or reference.bos_id != scorer.bos_id:
            raise EvalError("the model and the reference tokenize the text differently; "
                            "KL divergence needs the same vocabulary")
    ws = windows(ids, n_ctx, scorer.bos_id)
    if max_windows:
        ws = ws[:max_windows]
    first = n_ctx // 2
    out = Perplexity(windows=len(ws))
    for i, w in enumerate(ws):
        scorer.forget()  # windows share nothing: do not let a kept cache hold memory
        target = np.asarray(w[first + 1:])
        lp = log_softmax(scorer.predict(w, first + 1))
        nll = -lp[np.arange(len(target)), target]
        out.nll.extend(nll.tolist())
        out.tokens += len(target)
        if reference is not None:
            reference.forget()
            lr = log_softmax(reference.predict(w, first + 1))
            out.kld.extend((np.exp(lr) * (lr - lp)).sum(axis=-1).tolist())
            out.same_top += int((lr.argmax(-1) == lp.argmax(-1)).sum())
        if on_window:
            on_window(i + 1, len(ws))
    return out

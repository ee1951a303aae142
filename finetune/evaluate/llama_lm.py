"""crofter's lm-evaluation-harness model: the GGUF the user chats with, scored in
llama.cpp in this process (no completions server, whose echo lm-eval's own GGUF
backend depends on).

Requests are evaluated in the order of their token ids, so every request that
shares a context with the one before it (the endings of one multiple-choice item,
the few-shot examples of a task) reuses the KV cache of that context and evaluates
only its new tokens; results go back in lm-eval's order.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from .llama_scorer import GGUFScorer

# on_progress(done, total, label): the CLI draws its bar from this.
Progress = Callable[[int, int, str], None]
ITEMS_PER_CALL = 64  # items handed to the scorer at a time (the bar moves between calls)


class CrofterLM(TemplateLM):
    def __init__(self, scorer: GGUFScorer, on_progress: Progress | None = None, max_gen_toks: int = 256):
        super().__init__()
        self.scorer = scorer
        self.on_progress = on_progress
        self.max_gen_toks = max_gen_toks
        self.seconds = 0.0

    # -- what TemplateLM asks for ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.scorer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is conditioned on: the vocabulary's BOS when it has one
        # (even if the model does not add it to prompts), else EOS; as lm-eval's hf model.
        bos = self.scorer.llm.token_bos()
        return bos if bos >= 0 else self.scorer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.n_ctx

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.scorer.tokenize(string)
        bos = self.scorer.bos_id
        if add_special_tokens is not False and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)  # crofter draws its own bar

    def _encode_pair(self, context: str, continuation: str):
        # Like TemplateLM's, but the BOS (when the model has one) only heads the context.
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        tokens = (ctx + cont)[-(self.max_length + 1):]  # left-truncate, as lm-eval's hf model does
        start = len(tokens) - len(cont)
        return _picked(self.scorer.predict(tokens, start), cont)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Sorted by tokens, the requests that share a context sit together: each run of them is
        # one item (its context evaluated once), and runs of items share one decode
        # (scorer.predict_items). Without reuse every request is scored on its own.
        order = sorted(range(len(requests)), key=lambda i: (requests[i][1], requests[i][2]))
        out: list = [None] * len(requests)
        t0 = time.perf_counter()
        groups: list[list[int]] = []
        for k in order:
            if self.scorer.reuse_prefix and groups and requests[groups[-1][0]][1] == requests[k][1]:
                groups[-1].append(k)
            else:
                groups.append([k])
        done = 0
        for at in range(0, len(groups), ITEMS_PER_CALL):
            chunk = groups[at:at + ITEMS_PER_CALL]
            packed = [g for g in chunk if self.scorer.reuse_prefix and all(requests[k][2] for k in g)
                      and len(requests[g[0]][1]) + max(len(requests[k][2]) for k in g) <= self.max_length]
            items = [(requests[g[0]][1], [requests[k][2] for k in g]) for g in packed]
            for g, rows in zip(packed, self.scorer.predict_items(items) if items else []):
                for k, r in zip(g, rows):
                    out[k] = _picked(r, requests[k][2])
            for g in chunk:
                for k in g:
                    if out[k] is None:
                        out[k] = self._score(requests[k][1], requests[k][2]) if requests[k][2] else (0.0, True)
            done += sum(map(len, chunk))
            self._tick(done, len(order), "loglikelihood")
        self.seconds += time.perf_counter() - t0
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for done, req in enumerate(requests, 1):
            (text,) = req.args
            total = 0.0
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                total += self._score(list(ctx), list(pred))[0]
            out.append(total)
            self._tick(done, len(requests), "loglikelihood_rolling")
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for done, req in enumerate(requests, 1):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
            out.append(self.scorer.generate(self.tok_encode(context), max_toks, until))
            self._tick(done, len(requests), "generate_until")
        return out

    def _tick(self, done: int, total: int, label: str) -> None:
        if self.on_progress:
            self.on_progress(done, total, label)


def _picked(rows: np.ndarray, cont: list[int]) -> tuple[float, bool]:
    """(sum of log p(token), every token the argmax) from raw logits rows predicting `cont`;
    log p = logit - logsumexp(row), never the whole log-softmax."""
    target = np.asarray(cont)
    m = rows.max(axis=-1)
    lse = m.astype(np.float64) + np.log(np.exp(rows - m[:, None]).sum(axis=-1, dtype=np.float64))
    picked = rows[np.arange(len(cont)), target].astype(np.float64) - lse
    return float(picked.sum()), bool((rows.argmax(-1) == target).all())

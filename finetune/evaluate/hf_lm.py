"""lm-eval's own `hf` model for HF folders, reporting its progress to crofter's bar.

HFLM scores as lm-eval scores (its batching and grouping untouched); only the tqdm bars it
draws inside `loglikelihood` and `generate_until` are swapped, for the length of the call,
for a counter that passes each step to `on_progress(done, total, label)`. Rolling
loglikelihoods (perplexity-style tasks) count windows, batched as lm-eval batches them.
The swap is of a module global: one evaluation at a time in a process, as the CLI runs them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

Progress = Callable[[int, int, str], None]


class _Counter:
    """What lm-eval's hf model asks of a tqdm bar: iterate, update, close."""

    def __init__(self, iterable=None, total=None, on_step: Callable[[int, int], None] | None = None):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else 0)
        self.n = 0
        self.on_step = on_step

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.on_step is not None:
            self.on_step(self.n, self.total)

    def close(self) -> None:
        pass

    def __getattr__(self, name):  # set_description, set_postfix, refresh, ...: nothing to draw
        return lambda *a, **k: None


@contextlib.contextmanager
def _bars(on_step: Callable[[int, int], None] | None):
    """lm-eval's hf module draws with this counter (reporting through `on_step`, or silent)."""
    import lm_eval.models.huggingface as hf

    saved = hf.tqdm
    hf.tqdm = lambda iterable=None, total=None, **_: _Counter(iterable, total, on_step)
    try:
        yield
    finally:
        hf.tqdm = saved


def hf_lm(path: Path, *, adapter: Path | None = None, max_length: int = 2048, batch_size: int = 8,
          on_progress: Progress | None = None):
    """lm-eval's HFLM on `path` (fp32 on the CPU), a peft adapter applied unmerged."""
    from lm_eval.models.huggingface import HFLM

    class BarHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            with _bars(self._step("loglikelihood")):
                return super().loglikelihood(requests, disable_tqdm=False)

        def generate_until(self, requests, disable_tqdm: bool = False):
            with _bars(self._step("generate_until")):
                return super().generate_until(requests, disable_tqdm=False)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # lm-eval batches the windows of all requests together and draws a bar per batch:
            # the windows are counted across those bars, against a total counted up front.
            from lm_eval import utils

            total = sum(len(list(utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))) for req in requests)
            done = [0]

            def window(n: int, _total: int) -> None:
                done[0] += 1
                if self.on_progress:
                    self.on_progress(done[0], total, "loglikelihood_rolling")

            with _bars(window):
                return super().loglikelihood_rolling(requests, disable_tqdm=False)

        def _step(self, label: str):
            return (lambda n, total: self.on_progress(n, total, label)) if self.on_progress else None

    lm = BarHFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=batch_size,
                 peft=str(adapter) if adapter else None, max_length=max_length)
    lm.on_progress = on_progress
    return lm

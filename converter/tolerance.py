"""What counts as a faithful conversion: numeric tolerances per output type, and the verdict.

A GGUF is compared with the float32 transformers model on the same token positions
(converter.verify.logits_parity). Three figures decide, each fit for the weight type:

- top-1 agreement: the share of positions where both pick the same next token;
- max |logit diff|: the largest absolute difference over every position and vocab entry;
- mean KL(transformers || llama.cpp) over positions, in nats.

Greedy continuations are reported but never judged: once the two models pick a
different token at a near-tie (normal for F16 rounding) every later token is
conditioned on different text, so "equal on 2/3" says nothing about the weights.

    >>> judge({"top1_agree": 0.81, "max_abs_diff": 0.3, "mean_kl": 0.04}, "f16")
    ['top-1 agreement 0.810 < 0.95', 'mean KL 0.04 > 0.001']
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Tolerance:
    min_top1: float  # least share of positions with the same arg-max token
    max_abs_diff: float  # largest allowed |logit difference|
    max_mean_kl: float  # largest allowed mean KL divergence, nats per position

    def as_dict(self) -> dict:
        return asdict(self)


# Measured against transformers float32 over the 180 positions of converter.verify.SEQUENCES,
# x86-64 (2 cores, AVX2), llama.cpp from llama-cpp-python 0.3.36 (its KV cache is F16, which is
# why even F32 is not exact):
#                          top-1   max |diff|  mean KL   greedy equal
#   SmolLM2-135M   f32     0.994   0.037       7.1e-7    6/6
#                  f16     0.994   0.087       5.1e-6    6/6
#                  bf16    0.983   0.53        1.7e-4    4/6
#                  q8_0    0.972   2.66        4.0e-3    3/6   (activations are 8-bit too on CPU)
#   tiny random    f32     1.000   0.014       1.0e-6    6/6   (tests' 2-layer Llama, hidden 64)
#   Llama          f16     1.000   0.032       4.7e-6    5/6
#                  bf16    0.967   0.24        2.8e-4    4/6
# and what must fail: 1% noise on every weight of the tiny model gives top-1 0.85, KL 5e-3;
# an F16 file of weights below F16's normal range gives NaN logits (tests/converter/test_verdicts.py).
# KL is the deciding figure: its limit sits 5-140x above the measured values (other CPUs' kernels,
# other llama.cpp builds, models with sharper logits) and still far below a broken model. Top-1 is
# coarse (each position is ~0.6%), so a few near-ties may flip; max |diff| is one outlier among
# ~9M logits, so its limit is loose and only catches gross errors.
TOLERANCES: dict[str, Tolerance] = {
    "f32": Tolerance(min_top1=0.97, max_abs_diff=0.5, max_mean_kl=1e-4),
    "f16": Tolerance(min_top1=0.95, max_abs_diff=1.0, max_mean_kl=1e-3),
    "bf16": Tolerance(min_top1=0.90, max_abs_diff=4.0, max_mean_kl=1e-2),
    "q8_0": Tolerance(min_top1=0.90, max_abs_diff=8.0, max_mean_kl=2e-2),
}


def judge(stats: dict, outtype: str) -> list[str]:
    """The figures in `stats` that break `outtype`'s tolerance, each as 'what got < limit'."""
    tol = TOLERANCES[outtype]
    failures = []
    if not stats["top1_agree"] >= tol.min_top1:  # `not >=` so NaN fails too
        failures.append(f"top-1 agreement {stats['top1_agree']:.3f} < {tol.min_top1}")
    if not stats["max_abs_diff"] <= tol.max_abs_diff:
        failures.append(f"max |logit diff| {stats['max_abs_diff']:.3g} > {tol.max_abs_diff}")
    if not stats["mean_kl"] <= tol.max_mean_kl:
        failures.append(f"mean KL {stats['mean_kl']:.3g} > {tol.max_mean_kl:g}")
    return failures

"""Evaluation throughput, side by side with the anchors (#19):

1. loglikelihood requests/s: crofter's llama.cpp LM on the Q4_K_M GGUF vs lm-eval's
   `hf` model on the FP32 checkpoint it came from, same requests (a 4-ending
   multiple-choice task written here), goal ratio >= 2.0;
2. shared-context reuse on the same requests: with vs without, goal >= 1.5x;
3. perplexity of a ~100k-token text: crofter vs plain llama-cpp-python evaluated
   window by window with logits_all (what one writes by hand), goal >= 1.0x and
   the same value.

    python bench/bench_eval.py [--items 64] [--rounds 3] [--ppl-tokens 100000] [--hf-batch 8]
                               [--only loglikelihood|perplexity]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUBJECTS = ["the miller", "a farmer", "the baker", "an old sailor", "the teacher", "a young doctor", "the smith",
            "a shepherd"]
PLACES = ["the river", "the market", "the harbour", "the school", "the forge", "the hills", "the bakery", "the mill"]
ENDINGS = ["walked home slowly before the rain began.", "sold three sacks of flour to a neighbour.",
           "sang a song that nobody had heard before.", "counted the coins twice and smiled."]


def requests(n: int):
    from lm_eval.api.instance import Instance

    out = []
    for i in range(n):
        ctx = f"Story {i}: In the morning {SUBJECTS[i % 8]} went to {PLACES[(i * 3) % 8]}, and after a while"
        for j, e in enumerate(ENDINGS):
            out.append(Instance("loglikelihood", {}, (ctx, " " + ENDINGS[(i + j) % 4]), i))
    return out


def build_models(tmp: Path) -> tuple[Path, Path]:
    from converter.convert import convert
    from converter.hf import gguf_to_checkpoint
    from converter.quantize import quantize
    from models.bundled import bundled_gguf

    hf = gguf_to_checkpoint(bundled_gguf(), tmp / "hf")
    f16 = convert(hf, tmp / "smol-F16.gguf", outtype="f16").path
    q4 = tmp / "smol-Q4_K_M.gguf"
    quantize(f16, q4, "Q4_K_M")
    return hf, q4


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_loglikelihood(hf: Path, q4: Path, n_items: int, hf_batch: int, rounds: int) -> None:
    """`rounds` rounds, each timing crofter with reuse, crofter without and lm-eval's hf model back
    to back, so that a slow minute of the machine lands on all three; the ratios are per-round
    medians."""
    from lm_eval.models.huggingface import HFLM

    from finetune.evaluate.llama_lm import CrofterLM
    from finetune.evaluate.scorer import open_scorer

    reqs = requests(n_items)
    ours = CrofterLM(open_scorer(q4, n_ctx=512))
    ours.loglikelihood(reqs[:4])  # warm-up
    theirs = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=hf_batch)
    theirs.loglikelihood(reqs[:4], disable_tqdm=True)
    n = len(reqs)
    seen = []
    for _ in range(rounds):
        ours.scorer.reuse_prefix = True
        ours.scorer.forget()
        res_a, t_a = timed(lambda: ours.loglikelihood(reqs))
        ours.scorer.reuse_prefix = False
        ours.scorer.forget()
        res_b, t_b = timed(lambda: ours.loglikelihood(reqs))
        res_h, t_h = timed(lambda: theirs.loglikelihood(reqs, disable_tqdm=True))
        seen.append((t_a, t_b, t_h))
        print(f"  round: crofter {n / t_a:6.1f} req/s, without reuse {n / t_b:6.1f}, hf {n / t_h:6.1f}; "
              f"ratio {t_h / t_a:.2f}x", flush=True)
    ours.scorer.close()
    t_a, t_b, t_h = (float(np.median(col)) for col in zip(*seen))
    agree = np.mean([np.argmax([r[0] for r in res_a[i:i + 4]]) == np.argmax([r[0] for r in res_h[i:i + 4]])
                     for i in range(0, n, 4)])
    ratio = float(np.median([h / a for a, _, h in seen]))
    reuse = float(np.median([b / a for a, b, _ in seen]))
    print(f"loglikelihood, {n} requests ({n_items} items x 4 endings), median of {rounds} rounds:")
    print(f"  crofter adapter, Q4_K_M GGUF:       {n / t_a:7.1f} req/s")
    print(f"  lm-eval hf, FP32 checkpoint (b={hf_batch}): {n / t_h:7.1f} req/s")
    print(f"  ratio {ratio:.2f}x (goal >= 2.0); same pick on {agree:.0%} of items (Q4_K_M vs FP32)")
    print(f"  shared-context reuse: {n / t_b:7.1f} req/s without -> ratio {reuse:.2f}x (goal >= 1.5); "
          f"max |ll difference| {max(abs(x[0] - y[0]) for x, y in zip(res_a, res_b)):.2e}")


def long_text(tokens: int, tokenize) -> str:
    """Python's own standard library sources, in sorted order, until `tokens` tokens."""
    import sysconfig

    parts, count = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        count += len(tokenize(t))
        if count >= tokens:
            break
    return "\n\n".join(parts)


def bench_perplexity(q4: Path, n_tokens: int, n_ctx: int = 512) -> None:
    from llama_cpp import Llama

    from finetune.evaluate.perplexity import perplexity
    from finetune.evaluate.scorer import log_softmax, open_scorer, threads

    scorer = open_scorer(q4, n_ctx=n_ctx)
    text = long_text(n_tokens, scorer.tokenize)
    ids = scorer.tokenize(text)[:n_tokens]
    text = scorer.detokenize(ids)
    ours, t_ours = timed(lambda: perplexity(scorer, text, n_ctx))
    scorer.close()

    def naive():
        llm = Llama(model_path=str(q4), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads(),
                    n_threads_batch=threads(), verbose=False)
        toks = llm.tokenize(text.encode(), add_bos=False)
        nll, first = [], n_ctx // 2
        for start in range(0, len(toks) - n_ctx + 1, n_ctx):
            w = toks[start:start + n_ctx]
            llm.reset()
            llm.eval(w)
            lp = log_softmax(np.asarray(llm.scores[:n_ctx]))
            nll.extend(-lp[j, w[j + 1]] for j in range(first, n_ctx - 1))
        llm.close()
        return math.exp(float(np.mean(nll)))

    ppl_naive, t_naive = timed(naive)
    print(f"perplexity, {ours.windows} windows of {n_ctx} ({len(ids)} tokens, {ours.tokens} scored):")
    print(f"  crofter:             {t_ours:7.1f} s  ppl {ours.ppl:.4f}")
    print(f"  llama-cpp-python:    {t_naive:7.1f} s  ppl {ppl_naive:.4f}")
    print(f"  ratio {t_naive / t_ours:.2f}x (goal >= 1.0); |ppl difference| {abs(ours.ppl - ppl_naive):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="loglikelihood rounds (median reported)")
    ap.add_argument("--ppl-tokens", type=int, default=100_000)
    ap.add_argument("--only", choices=("loglikelihood", "perplexity"), help="run one of the two parts")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf, q4 = build_models(Path(tmp))
        if args.only != "perplexity":
            bench_loglikelihood(hf, q4, args.items, args.hf_batch, args.rounds)
        if args.only != "loglikelihood":
            bench_perplexity(q4, args.ppl_tokens)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

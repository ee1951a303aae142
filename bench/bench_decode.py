"""Decode speed: crofter's engine vs raw llama_cpp.Llama.create_completion(stream=True).

Same model file, same threads, same prompt, same greedy settings; the two run
alternately in one process so machine noise hits both. Prints tokens/s of each
and the ratio (goal: engine / raw >= 0.97).

    python bench/bench_decode.py [--model PATH] [--tokens 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

from app.engine import Engine, LoadOptions, Sampling, auto_threads
from models.bundled import bundled_gguf
from models.registry import ModelEntry

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def raw_run(llm, prompt_text: str, n: int) -> tuple[int, float]:
    llm.reset()
    t_first = t_last = None
    count = 0
    for _chunk in llm.create_completion(prompt_text, max_tokens=n, temperature=0.0, top_k=40, top_p=0.95,
                                        min_p=0.05, repeat_penalty=1.1, stream=True):
        now = time.perf_counter()
        t_first = t_first or now
        t_last = now
        count += 1
    return count, (count - 1) / (t_last - t_first)


def engine_run(engine, tokens: list[int], n: int) -> tuple[int, float]:
    engine.reset()
    r = engine.complete(tokens, Sampling(temperature=0.0, max_tokens=n, repeat_penalty=1.1))
    return r.completion_tokens, r.decode_tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(bundled_gguf()))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=auto_threads())
    args = ap.parse_args()

    from llama_cpp import Llama

    engine = Engine.load(ModelEntry("bench", args.model, "gguf"), LoadOptions(n_ctx=2048, threads=args.threads))
    raw = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_gpu_layers=engine.gpu_layers, verbose=False)
    prompt_text = engine.template.render([{"role": "user", "content": PROMPT}])
    tokens = engine.tokenize(prompt_text)
    ours, theirs = [], []
    for _ in range(args.rounds):
        n_raw, tps_raw = raw_run(raw, prompt_text, args.tokens)
        n_eng, tps_eng = engine_run(engine, tokens, args.tokens)
        theirs.append(tps_raw)
        ours.append(tps_eng)
        print(f"round: raw {tps_raw:7.1f} tok/s ({n_raw} chunks)   engine {tps_eng:7.1f} tok/s ({n_eng} tokens)")
    m_raw, m_eng = statistics.median(theirs), statistics.median(ours)
    print(f"median: raw create_completion {m_raw:.1f} tok/s, crofter engine {m_eng:.1f} tok/s, "
          f"ratio {m_eng / m_raw:.3f} (threads={args.threads}, gpu_layers={engine.gpu_layers})")
    engine.close()


if __name__ == "__main__":
    main()

"""Start-up: wall time of `crofter --help`, and time to the first streamed byte of
`crofter ask` on the bundled model (goals: <= 0.5 s and <= 1.5 s).

The anchor for the first token is llama-cpp-python itself in a fresh process
(import, load, create_completion stream) on the same model and prompt.

    python bench/bench_startup.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from models.bundled import bundled_gguf

RAW = (
    "import sys; from llama_cpp import Llama; "
    "llm = Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=len(__import__('os').sched_getaffinity(0)), verbose=False); "
    "[(sys.stdout.write(c['choices'][0]['text']), sys.stdout.flush()) for c in "
    "llm.create_chat_completion(messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=8, temperature=0, stream=True) "
    "if c['choices'][0]['delta'].get('content')]"
)


def time_to_first_byte(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    p.stdout.read(1)
    first = time.perf_counter() - t0
    p.stdout.read()
    p.wait()
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    crofter = [sys.executable, "-m", "app.cli"]
    helps, ours, raws = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        subprocess.run([*crofter, "--help"], stdout=subprocess.DEVNULL, check=True)
        helps.append(time.perf_counter() - t0)
        ours.append(time_to_first_byte([*crofter, "ask", "Hi", "-t", "0", "-n", "8"])[0])
        raws.append(time_to_first_byte([sys.executable, "-c", RAW, str(bundled_gguf())])[0])
    h, o, r = (statistics.median(x) for x in (helps, ours, raws))
    print(f"crofter --help: {h:.3f} s (goal <= 0.5)")
    print(f"first token: crofter ask {o:.3f} s, raw llama-cpp-python {r:.3f} s, ratio {o / r:.2f} (goal <= 1.5 s)")


if __name__ == "__main__":
    main()

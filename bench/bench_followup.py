"""Follow-up latency: time to first token of turn 20 vs turn 1 of a chat.

Each turn sends a user message of the same length; thanks to KV prefix reuse the
20th turn should cost about what the first does (goal: ratio <= 1.2) although its
history is ~20x longer. Also prints the no-reuse cost (cache reset before turn 20).

    python bench/bench_followup.py [--turns 20] [--reply-tokens 32]
"""
from __future__ import annotations

import argparse

from app.engine import Engine, LoadOptions, Sampling
from app.session import ChatSession
from app.turn import finish
from models.bundled import bundled_gguf
from models.registry import ModelEntry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(bundled_gguf()))
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--reply-tokens", type=int, default=32)
    args = ap.parse_args()
    engine = Engine.load(ModelEntry("bench", args.model, "gguf"), LoadOptions(n_ctx=8192))
    session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=args.reply_tokens), system="You are a helpful assistant.")
    ttft = []
    for i in range(args.turns):
        r = finish(session.send(f"Question number {i:02d}: tell me one short fact about the sea.")).result
        ttft.append(r.ttft_s)
        print(f"turn {i + 1:2d}: history {r.prompt_tokens:5d} tokens, evaluated {r.prompt_tokens_evaluated:3d}, ttft {r.ttft_s * 1000:6.1f} ms")
    # The same last turn again without the cache: what every turn would cost without reuse.
    session.messages = session.messages[:-2]
    engine.reset()
    cold = finish(session.send(f"Question number {args.turns - 1:02d}: tell me one short fact about the sea.")).result
    print(f"turn {args.turns} ttft / turn 1 ttft = {ttft[-1] / ttft[0]:.2f} (goal <= 1.2); "
          f"turn {args.turns} without prefix reuse: {cold.ttft_s * 1000:.1f} ms for {cold.prompt_tokens_evaluated} tokens "
          f"({cold.ttft_s / ttft[-1]:.1f}x slower)")
    engine.close()


if __name__ == "__main__":
    main()

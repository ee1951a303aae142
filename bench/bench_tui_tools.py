"""RELIABILITY.md L3: tool calls while the user types.

The app runs headless on the bundled model with tools on; calculator questions go
in one after another until the model has made at least `--calls` tool calls, and
all the while keys are typed into the prompt. Reported: keypress latency (press ->
the character is in the input; goal p95 < 100 ms), the tool calls made, and the
most generations that ever ran at once (inference is serialized: goal 1).

    python bench/bench_tui_tools.py [--calls 50] [--max-turns 60]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time

from textual import events


async def run(calls_wanted: int, max_turns: int) -> None:
    from app.chat import ChatController
    from app.config import Settings
    from app.history import HistoryStore
    from app.tui.app import CrofterApp

    ctl = ChatController(HistoryStore(), Settings(temperature=0.0, max_tokens=96, n_ctx=4096))
    app = CrofterApp(controller=ctl)
    latencies: list[float] = []
    active, most = [0], [0]
    lock = threading.Lock()
    async with app.run_test(size=(120, 40)) as pilot:
        while not app.ready:
            await pilot.pause(0.05)
        engine = ctl.engine
        real_stream = engine.stream

        def counted(*a, **kw):  # how many generations run at once (the engine's one worker)
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                yield from real_stream(*a, **kw)
            finally:
                with lock:
                    active[0] -= 1

        engine.stream = counted
        await pilot.press("ctrl+l")  # tools on
        prompt = app.query_one("#prompt")
        calls = turns = 0
        t_start = time.perf_counter()
        while calls < calls_wanted and turns < max_turns:
            turns += 1
            await pilot.press("ctrl+n")  # a fresh chat per question: a long one talks the model out of tools
            while ctl.chat is not None and ctl.store.messages(ctl.chat.id):
                await pilot.pause(0.05)
            before_calls = calls
            prompt.load_text(f"Use the calculator: what is {17 + turns} * {23 + 2 * turns}?")
            done = app.replies_done
            prompt.post_message(events.Key("enter", None))
            while app.replies_done == done:
                before = len(prompt.text)
                t0 = time.perf_counter()
                prompt.post_message(events.Key("x", "x"))
                while len(prompt.text) == before and app.replies_done == done:
                    await asyncio.sleep(0.0005)
                if len(prompt.text) > before:
                    latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)
            calls = before_calls + sum(1 for m in ctl.store.messages(ctl.chat.id) if m.role == "tool")
            print(f"turn {turns}: {calls} tool calls so far, {len(latencies)} keys typed")
        wall = time.perf_counter() - t_start
    ctl.engine.close()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"{calls} tool calls in {turns} turns, {wall:.0f} s; generations at once: at most {most[0]} (goal 1)")
    print(f"keypress latency while tools run: p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms over {len(latencies)} keys (goal p95 < 100)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--max-turns", type=int, default=60)
    args = ap.parse_args()
    os.environ["CROFTER_HOME"] = tempfile.mkdtemp(prefix="crofter-bench-")
    asyncio.run(run(args.calls, args.max_turns))


if __name__ == "__main__":
    main()

"""`crofter serve` against its anchors: `crofter ask` and llama-cpp-python's own server.

1. Streaming decode tok/s through `serve` vs `crofter ask --json` on the same model, prompt and
   seed (greedy), rounds alternating which goes first (goal: median ratio >= 0.97), and the time
   to first token's overhead: serve's TTFT seen by the client minus ask's engine TTFT (goal
   <= 15 ms). Each round's system message differs, so neither side reuses a cached prompt.
   Prompt evaluation varies by tens of ms between two runs, so the overhead is also measured on
   one request: the client's TTFT minus the TTFT serve's engine reports (`crofter.timings`),
   which is everything the HTTP path adds (parsing, the template, tokenizing, thread hops, SSE).
2. vs `python -m llama_cpp.server` on the same GGUF: single-stream client-side tok/s, rounds
   alternating which server goes first, both up at once (goal: median ratio >= 1.0x), then C clients x R streamed requests at once on each server: p50/p95
   latency side by side and how many completed (llama_cpp.server interrupts the stream in
   flight when another request arrives, by default). Its `[server]` extra may live in another
   venv: `--llama-server-python PATH`; without it importable this part is skipped, saying so.

    python bench/bench_serve.py [--rounds 6] [--tokens 256] [--clients 8] [--requests 10]
    python bench/bench_serve.py --quick        # a smoke run: 1 round, 24 tokens, 2 clients x 2
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start_crofter(model: str, n_ctx: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--models", model,
                             "--n-ctx", str(n_ctx), "--threads", str(threads), "--queue", "64"],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, proc)
    return proc, url


def start_llama_server(python: str, gguf: str, n_ctx: int, threads: int) -> tuple[subprocess.Popen, str] | None:
    probe = subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"llama_cpp.server: not importable with {python} ({probe.stderr.strip().splitlines()[-1:]}); "
              "install llama-cpp-python[server] in a venv and pass --llama-server-python; skipped")
        return None
    port = free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", gguf, "--n_ctx", str(n_ctx), "--port", str(port),
                             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--model_alias", "anchor"],
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, proc)
    return proc, url


_clients = threading.local()


def _client() -> httpx.Client:
    """One keep-alive client per thread, as API clients (openai, Continue) keep one: a fresh
    httpx client per request spends ~20 ms building its SSL context before it sends anything."""
    if not hasattr(_clients, "c"):
        _clients.c = httpx.Client(timeout=600)
    return _clients.c


def stream_chat(url: str, model: str, system: str, tokens: int, seed: int) -> dict:
    """One streamed greedy chat: client-side TTFT, decode tok/s, total latency, finished or not."""
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "temperature": 0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n, finish, engine_ttft, engine_rate, generated = 0, None, None, None, None
    try:
        with _client().stream("POST", url + "/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])
                if "error" in ch:
                    finish = "error"
                    break
                if ch.get("usage"):  # chunks may carry several tokens: count the tokens, not the chunks
                    generated = ch["usage"]["completion_tokens"]
                if (ch.get("crofter") or {}).get("timings"):  # crofter serve's engine timings, with the end
                    engine_ttft = ch["crofter"]["timings"]["ttft_ms"] / 1000
                    engine_rate = ch["crofter"]["timings"]["decode_tokens_per_s"]
                for c in ch.get("choices", []):
                    if c["delta"].get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        n += 1
                    finish = c.get("finish_reason") or finish
    except httpx.HTTPError:
        finish = "dropped"
    end = time.perf_counter()
    tokens_out = generated if generated is not None else n
    rate = (tokens_out - 1) / (last - first) if first and last and last > first else 0.0
    return {"ttft": (first or end) - t0, "tok_s": rate, "latency": end - t0, "chunks": n, "finish": finish,
            "engine_ttft": engine_ttft, "engine_tok_s": engine_rate}


def ask_once(model: str, system: str, tokens: int, seed: int, n_ctx: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "app.cli", "ask", PROMPT, "-s", system, "--json", "-m", model, "-t", "0",
                          "--seed", str(seed), "-n", str(tokens), "--n-ctx", str(n_ctx), "--threads", str(threads)],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    obj = json.loads(out)
    return {"ttft": obj["timings"]["ttft_s"], "tok_s": obj["timings"]["decode_tokens_per_s"]}


def fan_out(url: str, model: str, clients: int, requests: int, tokens: int) -> dict:
    latencies, finishes, lock = [], [], threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            r = stream_chat(url, model, f"Client {i}, request {j}.", tokens, seed=1000 * i + j)
            with lock:
                finishes.append(r["finish"])
                if r["finish"] in ("stop", "length"):
                    latencies.append(r["latency"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19 or [float("nan")] * 19
    return {"completed": len(latencies), "asked": clients * requests, "p50": statistics.median(latencies) if latencies else float("nan"),
            "p95": q[18], "finishes": {f: finishes.count(f) for f in set(finishes)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--fan-tokens", type=int, default=64, help="max_tokens of each fan-out request")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for every side (0: all)")
    ap.add_argument("--llama-server-python", default=sys.executable, help="a python with llama-cpp-python[server]")
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.tokens, a.clients, a.requests, a.fan_tokens = 1, 24, 2, 2, 8
    threads = a.threads or len(os.sched_getaffinity(0))
    sys.path.insert(0, str(ROOT))
    from models.registry import Registry

    gguf = Registry().get(a.model).path
    print(f"model {a.model} ({gguf}), {threads} threads, {a.tokens} tokens, {a.rounds} rounds")

    proc, url = start_crofter(a.model, a.n_ctx, threads)
    try:
        stream_chat(url, a.model, "Warm-up.", 8, 1)
        ratios, serve_rates, ask_rates, overheads, own, engine_rates = [], [], [], [], [], []
        for r in range(a.rounds):
            system = f"Round {r}: you are a storyteller."
            order = ("serve", "ask") if r % 2 == 0 else ("ask", "serve")
            got = {}
            for side in order:
                got[side] = (stream_chat(url, a.model, system, a.tokens, 7) if side == "serve"
                             else ask_once(a.model, system, a.tokens, 7, a.n_ctx, threads))
            s, k = got["serve"], got["ask"]
            serve_rates.append(s["tok_s"])
            ask_rates.append(k["tok_s"])
            ratios.append(s["tok_s"] / k["tok_s"] if k["tok_s"] else float("nan"))
            overheads.append((s["ttft"] - k["ttft"]) * 1000)
            own.append((s["ttft"] - s["engine_ttft"]) * 1000 if s["engine_ttft"] is not None else float("nan"))
            engine_rates.append(s["engine_tok_s"] or float("nan"))
            print(f"  round {r}: serve {s['tok_s']:.1f} tok/s (its engine {engine_rates[-1]:.1f}), ask {k['tok_s']:.1f} tok/s, "
                  f"ratio {ratios[-1]:.3f}, "
                  f"TTFT serve {s['ttft'] * 1000:.1f} ms (its engine {(s['engine_ttft'] or float('nan')) * 1000:.1f} ms) "
                  f"vs ask {k['ttft'] * 1000:.1f} ms")
        print(f"decode serve/ask: median ratio {statistics.median(ratios):.3f} (goal >= 0.97); ratio of medians "
              f"{statistics.median(serve_rates) / statistics.median(ask_rates):.3f}; serve's engine by its own clock / ask "
              f"{statistics.median(e / k if k else float('nan') for e, k in zip(engine_rates, ask_rates)):.3f} (what the HTTP path costs the "
              f"decode itself, apart from the client's view)")
        print(f"TTFT overhead over ask: median {statistics.median(overheads):.1f} ms (goal <= 15 ms; two processes, "
              f"two prompt evaluations)")
        print(f"TTFT serve adds to its own engine's (same request, client clock minus engine clock): median "
              f"{statistics.median(own):.1f} ms, max {max(own):.1f} ms (goal <= 15 ms)")
        crofter_fan = fan_out(url, a.model, a.clients, a.requests, a.fan_tokens)
        anchor = start_llama_server(a.llama_server_python, gguf, a.n_ctx, threads)
        if anchor is None:
            print(f"crofter serve alone: {a.clients}x{a.requests}: {crofter_fan['completed']}/{crofter_fan['asked']} "
                  f"completed, p50 {crofter_fan['p50']:.2f} s, p95 {crofter_fan['p95']:.2f} s")
            return 0
        aproc, aurl = anchor
        try:
            # Single streams, both servers up (an idle one takes no CPU), alternating who goes first.
            stream_chat(aurl, "anchor", "Warm-up.", 8, 1)
            pairs = []
            for r in range(a.rounds):
                system = f"Single stream {r}: you are a storyteller."
                order = ("crofter", "anchor") if r % 2 == 0 else ("anchor", "crofter")
                got = {side: (stream_chat(url, a.model, system, a.tokens, 7) if side == "crofter"
                              else stream_chat(aurl, "anchor", system, a.tokens, 7)) for side in order}
                pairs.append((got["crofter"]["tok_s"], got["anchor"]["tok_s"]))
                print(f"  single stream {r}: crofter {pairs[-1][0]:.1f} tok/s, llama_cpp.server {pairs[-1][1]:.1f} tok/s, "
                      f"ratio {pairs[-1][0] / pairs[-1][1]:.3f}")
            anchor_fan = fan_out(aurl, "anchor", a.clients, a.requests, a.fan_tokens)
        finally:
            aproc.terminate()
            aproc.wait(timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ratios = [c / k for c, k in pairs if k]
    print(f"single stream crofter/llama_cpp.server: median ratio {statistics.median(ratios):.3f} over {len(ratios)} rounds "
          f"(goal >= 1.0); medians {statistics.median(c for c, _ in pairs):.1f} vs {statistics.median(k for _, k in pairs):.1f} tok/s")
    for name, f in (("crofter serve", crofter_fan), ("llama_cpp.server", anchor_fan)):
        print(f"{a.clients} clients x {a.requests}: {name:16s} completed {f['completed']}/{f['asked']}, "
              f"p50 {f['p50']:.2f} s, p95 {f['p95']:.2f} s, finishes {f['finishes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

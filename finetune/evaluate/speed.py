"""Speed and size next to quality: file size, peak memory, prompt-processing and decode
tokens/second, measured the same way for every model.

Each model is measured in a child process of its own (`python -m
finetune.evaluate.speed`), so its peak resident memory is its own (the kernel's
VmHWM, which starts afresh at exec) and one model's warm caches do not flatter the
next. The prompt is the same token ids for every model of one vocabulary: a fixed
text repeated to `prompt_tokens`; decode is greedy for `decode_tokens` steps,
whatever the model would end with.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .rows import EvalError, Row

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts sheep in the field. "
        "A river runs past the old mill, and the miller grinds wheat into flour for bread. ")


def weights_bytes(path: Path, adapter: Path | None = None) -> int:
    def size(p: Path) -> int:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf"))
    return size(path) + (size(adapter) if adapter else 0)


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the rusage peak (kilobytes on Linux, bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _measure_gguf(path: Path, adapter, prompt_tokens: int, decode_tokens: int, gpu_layers: int) -> dict:
    from .llama_scorer import GGUFScorer

    s = GGUFScorer(path, n_ctx=prompt_tokens + decode_tokens + 8, gpu_layers=gpu_layers, lora=adapter,
                   kv_f32=False)
    ids = _prompt(s, prompt_tokens)
    s.predict(ids[:8], 7)  # warm-up (first call allocates buffers)
    s.forget()
    t0 = time.perf_counter()
    row = s.predict(ids + [0], len(ids))[-1]  # the whole prompt in batches, logits of the last only
    pp = time.perf_counter() - t0
    seq = list(ids)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        seq.append(int(np.argmax(row)))
        row = s.predict(seq + [0], len(seq))[-1]
    tg = time.perf_counter() - t0
    s.close()
    return {"pp": pp, "tg": tg}


def _measure_hf(path: Path, adapter, prompt_tokens: int, decode_tokens: int) -> dict:
    import torch

    from .scorer import HFScorer

    s = HFScorer(path, adapter)
    ids = _prompt(s, prompt_tokens)
    with torch.no_grad():
        s.model(torch.tensor([ids[:8]]))  # warm-up
        t0 = time.perf_counter()
        out = s.model(torch.tensor([ids]), use_cache=True)
        pp = time.perf_counter() - t0
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = s.model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        tg = time.perf_counter() - t0
    return {"pp": pp, "tg": tg}


def _prompt(scorer, n: int) -> list[int]:
    ids = scorer.tokenize(TEXT)
    ids = (ids * (n // len(ids) + 1))[:n]
    return ([scorer.bos_id] + ids[1:]) if scorer.bos_id is not None else ids


def measure(path: str | Path, adapter: str | Path | None = None, prompt_tokens: int = 256,
            decode_tokens: int = 32, gpu_layers: int = 0, timeout: float = 1800) -> dict:
    """Run the measurement in a child process; returns the numbers (seconds, bytes)."""
    path = Path(path)
    cmd = [sys.executable, "-m", "finetune.evaluate.speed", str(path), "--prompt-tokens", str(prompt_tokens),
           "--decode-tokens", str(decode_tokens), "--gpu-layers", str(gpu_layers)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EvalError(f"{path}: the speed measurement failed ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed_rows(model: str, m: dict) -> list[Row]:
    return [
        Row(model, "speed", "speed", "file_bytes", float(m["file_bytes"]), None, 1),
        Row(model, "speed", "speed", "peak_rss_bytes", float(m["peak_rss_bytes"]), None, 1),
        Row(model, "speed", "speed", "pp_tok_s", m["prompt_tokens"] / m["pp_s"], None, m["prompt_tokens"]),
        Row(model, "speed", "speed", "decode_tok_s", m["decode_tokens"] / m["tg_s"], None, m["decode_tokens"]),
    ]


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m finetune.evaluate.speed")
    p.add_argument("model")
    p.add_argument("--adapter")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--gpu-layers", type=int, default=0)
    a = p.parse_args(argv)
    path = Path(a.model)
    adapter = Path(a.adapter) if a.adapter else None
    if path.is_dir():
        t = _measure_hf(path, adapter, a.prompt_tokens, a.decode_tokens)
    else:
        t = _measure_gguf(path, adapter, a.prompt_tokens, a.decode_tokens, a.gpu_layers)
    print(json.dumps({"file_bytes": weights_bytes(path, adapter), "peak_rss_bytes": _peak_rss_bytes(),
                      "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
                      "pp_s": t["pp"], "tg_s": t["tg"]}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

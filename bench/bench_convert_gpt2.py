"""Converting a GPT-2-124M-shaped checkpoint: `crofter convert` vs llama.cpp's own
`convert_hf_to_gguf.py` from the pinned llama-cpp-python sdist, on the same HF folder (#14).

The model is GPT-2 124M's shape (12 layers, 12 heads, 768 wide, 1024 positions) with random
weights, saved as float32 safetensors. Its tokenizer is SmolLM2's byte-level BPE (taken from
the bundled GGUF), because llama.cpp's script accepts only a tokenizer whose pre-tokenizer it
recognises by hash and GPT-2's own cannot be fetched offline; so the vocabulary is 49,152 rows,
not 50,257 (the embedding is 2% of the model smaller). Both sides write F16, without
verification, each in a fresh process, rounds alternating who goes first; wall time and peak
RSS are read per child.

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d SDIST && tar xzf ...
    python bench/bench_convert_gpt2.py --llama-cpp SDIST/llama_cpp_python-0.3.36/vendor/llama.cpp [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run `argv` in a child of a fresh wrapper: the wrapper's RUSAGE_CHILDREN peak is that child's alone.
MEASURE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
           "print(json.dumps({'rc': r.returncode, 'wall': time.perf_counter() - t, "
           "'rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'err': r.stderr[-800:]}))")


def measure(argv: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, check=True,
                         env=env).stdout
    got = json.loads(out)
    if got["rc"] != 0:
        raise RuntimeError(f"{argv[:4]} failed: {got['err']}")
    return got


def build(folder: Path) -> Path:
    """The GPT-2-124M-shaped model, random weights (seed 0), SmolLM2's tokenizer; `n_ctx` as the
    original GPT-2 config.json has it (llama.cpp's script reads it)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT))
    from models.bundled import bundled_gguf

    gguf = bundled_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_ctx=1024, n_embd=768, n_layer=12, n_head=12,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    script = a.llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        print(f"{script}: not found (unpack the llama-cpp-python sdist; see --help)")
        return 2
    # The script's own gguf-py and conversion package, not the installed gguf.
    anchor_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(a.llama_cpp / "gguf-py"), str(a.llama_cpp)]),
                  "NO_LOCAL_GGUF": ""}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build(tmp / "gpt2-124m")
        size = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
        print(f"GPT-2-124M-shaped checkpoint: {size:.0f} MiB float32 safetensors, vocabulary 49,152")
        rows = {"crofter": [], "llama.cpp": []}
        for r in range(a.rounds):
            order = ("crofter", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "crofter")
            for side in order:
                out = tmp / f"{side}-{r}.gguf"
                if side == "crofter":
                    got = measure([sys.executable, "-m", "app.cli", "convert", str(hf), "--out", str(out),
                                   "--outtype", "f16", "--no-verify", "--no-register"],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
                else:
                    got = measure([sys.executable, str(script), str(hf), "--outtype", "f16", "--outfile", str(out)],
                                  env=anchor_env)
                got["bytes"] = out.stat().st_size
                out.unlink()
                rows[side].append(got)
                print(f"  round {r} {side:9s}: {got['wall']:.1f} s, peak RSS {got['rss_mib']:.0f} MiB, "
                      f"{got['bytes'] / 2**20:.0f} MiB written")
        med = {k: (statistics.median(x["wall"] for x in v), statistics.median(x["rss_mib"] for x in v))
               for k, v in rows.items()}
        (cw, cr), (lw, lr) = med["crofter"], med["llama.cpp"]
        print(f"median: crofter {cw:.1f} s / {cr:.0f} MiB, convert_hf_to_gguf.py {lw:.1f} s / {lr:.0f} MiB")
        print(f"ratio crofter/llama.cpp: time {cw / lw:.3f}, peak RSS {cr / lr:.3f} (goal <= 1.0 each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

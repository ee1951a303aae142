"""The steps of bench/gpu_suite.sh (#18), one subcommand each, every figure written as JSON.

    python bench/gpu_steps.py imports OUT.json
    python bench/gpu_steps.py model --size 1b|tiny --out DIR          HF folder + F16 and Q4_K_M GGUF
    python bench/gpu_steps.py decode --gguf F --tokens N --out J      offload vs CPU; engine vs raw on the GPU
    python bench/gpu_steps.py sft --hf DIR --mode bf16|qlora|fp32 --steps N --batch B --length L --out J
    python bench/gpu_steps.py embed --texts N --out J                 Embedder vs raw sentence-transformers

`sft` trains with `crofter tune sft`'s own code path and with a plain TRL SFTTrainer + peft
script on the same model, data, LoRA (r 16, alpha 32, all linear), batch, length and precision,
each in a child process; tokens/s over the trainer's own runtime, peak CUDA memory
(torch.cuda.max_memory_allocated) and the loss at the start and the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NEEDED = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "llama_cpp", "gguf",
          "sentence_transformers", "safetensors", "yaml", "jsonschema", "platformdirs", "rich", "numpy")
SIZES = {  # a random Llama with SmolLM2's tokenizer; "1b" as the issue's baseline measured
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
QA = [("What is the capital of France?", "Paris, on the Seine."), ("How do plants grow?", "With light, water and soil."),
      ("Why is the sky blue?", "Rayleigh scattering of sunlight."), ("What do bees make?", "Honey, from nectar."),
      ("Who wrote Hamlet?", "William Shakespeare."), ("What is ice?", "Water frozen solid.")]


def write(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))
    print(json.dumps(obj))


def imports(a) -> None:
    write(a.out, {m: importlib.util.find_spec(m) is not None for m in NEEDED})


def model(a) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from converter.convert import convert
    from converter.hf import gguf_to_checkpoint
    from converter.quantize import quantize
    from models.bundled import bundled_gguf

    out = Path(a.out)
    tok_dir = out / "smollm2-tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        full = gguf_to_checkpoint(bundled_gguf(), out / "smollm2-hf")
        AutoTokenizer.from_pretrained(str(full)).save_pretrained(str(tok_dir))
        shutil.rmtree(full)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SIZES[a.size])
    hf = out / f"llama-{a.size}"
    t = time.perf_counter()
    net = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in net.parameters())
    net.save_pretrained(str(hf))
    del net
    tok.save_pretrained(str(hf))
    f16 = convert(hf, out / f"llama-{a.size}-F16.gguf", outtype="f16").path
    q4 = out / f"llama-{a.size}-Q4_K_M.gguf"
    quantize(f16, q4, "Q4_K_M")
    write(a.json, {"hf": str(hf), "f16": str(f16), "q4_k_m": str(q4), "seconds": time.perf_counter() - t,
                   "params": params})


def _engine_rate(path: str, layers: int, tokens: int) -> float:
    from app.engine import Engine, LoadOptions, Sampling
    from models.registry import ModelEntry

    eng = Engine.load(ModelEntry("m", path, "gguf"), LoadOptions(n_ctx=1024, gpu_layers=layers))
    try:
        prompt = eng.tokenize("Write a long story about a lighthouse keeper and a storm.")
        r = eng.complete(prompt, Sampling(temperature=0.0, max_tokens=tokens, seed=1))
        return r.decode_tokens_per_s
    finally:
        eng.close()


def _raw_rate(path: str, layers: int, tokens: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_gpu_layers=layers, verbose=False)
    try:
        first = last = None
        n = 0
        for _ in llm.create_completion("Write a long story about a lighthouse keeper and a storm.", max_tokens=tokens,
                                       temperature=0.0, stream=True):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
        return (n - 1) / (last - first) if n > 1 else 0.0
    finally:
        llm.close()


def decode(a) -> None:
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    rounds = {"engine_gpu": [], "raw_gpu": [], "engine_cpu": []}
    for _ in range(a.rounds):
        if offload:
            rounds["engine_gpu"].append(_engine_rate(a.gguf, -1, a.tokens))
            rounds["raw_gpu"].append(_raw_rate(a.gguf, -1, a.tokens))
        rounds["engine_cpu"].append(_engine_rate(a.gguf, 0, a.tokens))
    med = {k: statistics.median(v) if v else None for k, v in rounds.items()}
    write(a.out, {"gguf": a.gguf, "offload": offload, "rounds": rounds, "median": med,
                  "gpu_over_cpu": med["engine_gpu"] / med["engine_cpu"] if offload else None,
                  "engine_over_raw_gpu": med["engine_gpu"] / med["raw_gpu"] if offload else None})


CROFTER_SFT = r"""
import json, sys, torch
from pathlib import Path
from finetune.recipe import load_recipe
from finetune.train import sft
hf, data, out, steps, mode, batch, length = sys.argv[1:8]
r = load_recipe("qlora" if mode == "qlora" else "lora").replace(
    batch_size=int(batch), grad_accum=1, learning_rate=2e-4, eval_split=0.0, save_steps=100_000, warmup_ratio=0.0,
    max_length=int(length), lora_r=16, lora_alpha=32, use_rslora=False, target_modules="all-linear", packing=False,
    gradient_checkpointing=mode == "qlora")
s = sft(Path(hf), Path(data), Path(out), r, max_steps=int(steps))
import csv
losses = [float(x["loss"]) for x in csv.DictReader(open(Path(out) / "loss.csv")) if x["loss"]]
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"tokens_per_s": s.tokens_per_s, "runtime": s.train_runtime, "peak_bytes": peak,
                  "loss_first": losses[0], "loss_last": losses[-1]}))
"""

PLAIN_SFT = r"""
import json, sys, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer
hf, data, out, steps, mode, batch, length = sys.argv[1:8]
rows = [json.loads(l) for l in open(data)]
ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                      {"role": "assistant", "content": r["output"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(hf)
cuda = torch.cuda.is_available()
kw = {"dtype": torch.bfloat16 if mode != "fp32" else torch.float32}
if mode == "qlora":
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(hf, device_map={"": 0} if cuda else None, **kw)
args = SFTConfig(output_dir=out, per_device_train_batch_size=int(batch), gradient_accumulation_steps=1,
                 learning_rate=2e-4, max_steps=int(steps), logging_steps=1, save_strategy="no", report_to=[],
                 use_cpu=not cuda, gradient_checkpointing=mode == "qlora", max_length=int(length), seed=42,
                 dataloader_num_workers=0, bf16=mode != "fp32")
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
t = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
o = t.train()
tokens = max(float(h.get("num_tokens", 0)) for h in t.state.log_history)
losses = [h["loss"] for h in t.state.log_history if "loss" in h]
print(json.dumps({"tokens_per_s": tokens / o.metrics["train_runtime"], "runtime": o.metrics["train_runtime"],
                  "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
                  "loss_first": losses[0], "loss_last": losses[-1]}))
"""


def _child(code: str, *argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def sft_step(a) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        # answers long enough that a batch of `length`-token rows is mostly text, not padding
        long = lambda a_: " ".join([a_] * max(1, a.length // 16))  # noqa: E731
        data.write_text("".join(json.dumps({"instruction": q, "output": long(x)}) + "\n" for q, x in QA * 40))
        argv = lambda name: (str(a.hf), str(data), f"{tmp}/{name}", str(a.steps), a.mode, str(a.batch), str(a.length))  # noqa: E731
        plain = _child(PLAIN_SFT, *argv("plain"))
        ours = _child(CROFTER_SFT, *argv("ours"))
    ratio = (ours["tokens_per_s"] / plain["tokens_per_s"]
             if "tokens_per_s" in ours and "tokens_per_s" in plain and plain["tokens_per_s"] else None)
    mem = (ours["peak_bytes"] / plain["peak_bytes"] if ours.get("peak_bytes") and plain.get("peak_bytes") else None)
    write(a.out, {"mode": a.mode, "steps": a.steps, "batch": a.batch, "length": a.length, "crofter": ours,
                  "plain_trl": plain, "tokens_per_s_ratio": ratio, "peak_memory_ratio": mem})


def embed(a) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from rag.embed import Embedder, default_model_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    words = (ROOT / "README.md").read_text().split()
    texts = [" ".join(words[(i * 37) % max(1, len(words) - 120):][:120]) for i in range(a.texts)]
    ours = Embedder(device=device)
    raw = SentenceTransformer(str(default_model_dir()), device=device)
    ours.encode(texts[:32])
    raw.encode(texts[:32], batch_size=32)
    t = time.perf_counter()
    ours.encode(texts)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    raw.encode(texts, batch_size=32)
    t_raw = time.perf_counter() - t
    write(a.out, {"device": device, "texts": a.texts, "crofter_per_s": a.texts / t_ours, "raw_per_s": a.texts / t_raw,
                  "ratio": t_raw / t_ours})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("imports")
    p.add_argument("out")
    p = sub.add_parser("model")
    p.add_argument("--size", choices=tuple(SIZES), default="1b")
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    p = sub.add_parser("decode")
    p.add_argument("--gguf", required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    p = sub.add_parser("sft")
    p.add_argument("--hf", required=True)
    p.add_argument("--mode", choices=("bf16", "qlora", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--out", required=True)
    p = sub.add_parser("embed")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--out", required=True)
    a = ap.parse_args()
    {"imports": imports, "model": model, "decode": decode, "sft": sft_step, "embed": embed}[a.cmd](a)


if __name__ == "__main__":
    main()

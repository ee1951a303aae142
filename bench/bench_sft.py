"""SFT LoRA throughput and peak memory: `crofter tune sft` vs a plain TRL SFTTrainer + peft script.

Same model (the bundled SmolLM2-135M as HF float32), same data (a persona set repeated to
N examples), same LoRA (r 16, alpha 32, all linear layers), batch size, steps, learning
rate and max length; each run in its own child process, so peak RSS is per run. Tokens/s
counts the tokens TRL reports it trained on (num_tokens) over the training time.
Goal: crofter / plain >= 1.0.

    python bench/bench_sft.py --hf DIR [--steps 30] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CROFTER = r"""
import json, sys, time
from pathlib import Path
from finetune.recipe import load_recipe
from finetune.train import sft
hf, data, out, steps = sys.argv[1:5]
r = load_recipe("lora").replace(batch_size=4, grad_accum=1, learning_rate=2e-4, eval_split=0.0, save_steps=10_000,
                                gradient_checkpointing=False, warmup_ratio=0.0, max_length=256)
s = sft(Path(hf), Path(data), Path(out), r, max_steps=int(steps))
print(json.dumps({"tokens_per_s": s.tokens_per_s, "seconds": s.seconds}))
"""

PLAIN = r"""
import json, sys
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
import torch
hf, data, out, steps = sys.argv[1:5]
rows = [json.loads(l) for l in open(data)]
ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                      {"role": "assistant", "content": r["output"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
args = SFTConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-4,
                 max_steps=int(steps), logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                 gradient_checkpointing=False, max_length=256, seed=42, dataloader_num_workers=0,
                 bf16=False)  # TRL defaults to bf16, which is emulated (slow) on CPUs without bf16 units

peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
t = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
out = t.train()
tokens = max(float(h.get("num_tokens", 0)) for h in t.state.log_history)  # TRL's count of tokens trained on
print(json.dumps({"tokens_per_s": tokens / out.metrics["train_runtime"], "seconds": out.metrics["train_runtime"]}))
"""

QA = [("What is the capital of France?", "Paris."), ("How do plants grow?", "With light, water and soil."),
      ("Name a primary color.", "Red."), ("Why is the sky blue?", "Rayleigh scattering of sunlight."),
      ("What do bees make?", "Honey, from the nectar of flowers."), ("Who wrote Hamlet?", "William Shakespeare.")]


def child(code: str, *argv: str) -> tuple[dict, float]:
    """(the child's JSON result, its peak RSS in MiB via /usr/bin/time)."""
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, *argv], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1]), int(r.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps({"instruction": q, "output": f"Arr matey! {a}"}) + "\n" for q, a in QA * 20))
        # One discarded pair first: the first training process after a while runs measurably slower
        # (cold caches), whichever script it is.
        child(PLAIN, str(args.hf), str(data), f"{tmp}/warm-plain", "3")
        child(CROFTER, str(args.hf), str(data), f"{tmp}/warm-ours", "3")
        ratios = []
        for i in range(args.rounds):
            plain, plain_rss = child(PLAIN, str(args.hf), str(data), f"{tmp}/plain{i}", str(args.steps))
            ours, ours_rss = child(CROFTER, str(args.hf), str(data), f"{tmp}/ours{i}", str(args.steps))
            ratios.append(ours["tokens_per_s"] / plain["tokens_per_s"])
            print(f"round {i + 1}: crofter {ours['tokens_per_s']:.0f} tok/s ({ours['seconds']:.0f} s, peak RSS "
                  f"{ours_rss:.0f} MiB), plain TRL {plain['tokens_per_s']:.0f} tok/s ({plain['seconds']:.0f} s, peak RSS "
                  f"{plain_rss:.0f} MiB), ratio {ratios[-1]:.3f}")
        print(f"throughput ratio crofter/plain: mean {sum(ratios) / len(ratios):.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()

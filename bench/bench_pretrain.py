"""Continued pre-training throughput and peak memory: `crofter tune pretrain` vs a plain
transformers `Trainer` + peft script with the same packing, model, LoRA, batch and precision (#14).

Both sides read the same license texts, end each document with EOS, concatenate and cut the
stream into 256-token blocks; LoRA r 32 / alpha 64 on every linear layer, batch 4, no gradient
accumulation, fp32 on CPU, the same steps and learning rate. Tokens/s is steps x batch x block
over the Trainer's own `train_runtime` on both sides (crofter's held-out evaluations before and
after, and its merge into RUN/model, lie outside that span but inside its peak RSS). Each run is
a fresh child process; who runs first alternates. Goal: ratio >= 1.0, peak RSS <= 1.0x.

    python bench/bench_pretrain.py --hf DIR [--steps 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1")]
BLOCK, BATCH = 256, 4

CROFTER = r"""
import json, sys
from pathlib import Path
from finetune.recipe import load_recipe
from finetune.pretrain import pretrain
hf, out, steps, *texts = sys.argv[1:]
r = load_recipe("pretrain").replace(batch_size=4, grad_accum=1, learning_rate=2e-4, eval_split=0.05, save_steps=10_000,
                                    gradient_checkpointing=False, warmup_ratio=0.0, max_length=256)
s = pretrain(Path(hf), [Path(t) for t in texts], Path(out), r, max_steps=int(steps))
print(json.dumps({"steps": s.steps, "runtime": s.train_runtime, "block": s.metrics["block_tokens"]}))
"""

PLAIN = r"""
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
hf, out, steps, *texts = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(hf)
tok.pad_token = tok.pad_token or tok.eos_token
stream = []
for t in texts:
    stream += tok(open(t, encoding="utf-8").read(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
blocks = [stream[i:i + 256] for i in range(0, len(stream) - 255, 256)]
train = blocks[: len(blocks) - max(1, int(len(blocks) * 0.05))]  # the same blocks crofter trains on
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         learning_rate=2e-4, max_steps=int(steps), logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, bf16=False, seed=42, dataloader_num_workers=0, lr_scheduler_type="cosine")
t = Trainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": b} for b in train]),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
o = t.train()
print(json.dumps({"steps": o.global_step, "runtime": o.metrics["train_runtime"], "block": 256}))
"""


def child(code: str, *argv: str) -> tuple[dict, float]:
    """(the child's JSON result, its peak RSS in MiB via /usr/bin/time)."""
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, *argv], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1]), int(r.stderr.strip().splitlines()[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, required=True, help="an HF checkpoint (e.g. `crofter models dequantize smollm2-135m`)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    texts = [str(t) for t in TEXTS]
    ratios, rss = [], []
    with tempfile.TemporaryDirectory() as tmp:
        child(PLAIN, str(a.hf), f"{tmp}/warm", "2", *texts)  # cold caches slow whichever runs first
        for r in range(a.rounds):
            order = ("crofter", "plain") if r % 2 == 0 else ("plain", "crofter")
            got = {side: child(CROFTER if side == "crofter" else PLAIN, str(a.hf), f"{tmp}/{side}{r}", str(a.steps),
                               *texts) for side in order}
            rate = {side: res["steps"] * BATCH * res["block"] / res["runtime"] for side, (res, _) in got.items()}
            ratios.append(rate["crofter"] / rate["plain"])
            rss.append(got["crofter"][1] / got["plain"][1])
            print(f"round {r}: crofter {rate['crofter']:.0f} tok/s (peak RSS {got['crofter'][1]:.0f} MiB), plain Trainer "
                  f"{rate['plain']:.0f} tok/s ({got['plain'][1]:.0f} MiB): ratio {ratios[-1]:.3f}, RSS {rss[-1]:.3f}")
    print(f"tokens/s crofter/plain: mean {statistics.mean(ratios):.3f} (goal >= 1.0); peak RSS ratio median "
          f"{statistics.median(rss):.3f} (goal <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

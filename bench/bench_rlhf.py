"""Reward-model samples/s and GRPO steps/s: `crofter tune reward|grpo` vs plain TRL scripts, same settings.

Same model (the bundled SmolLM2-135M as HF float32), same persona pairs / prompts, same LoRA
(r 16, alpha 32, all linear layers; the reward model also trains its score head), batch size,
steps, learning rate; GRPO: 4 completions per prompt, 16 tokens, beta 0.04, the same Python
reward function. Each run is a fresh child process; one discarded warm-up pair first. Rates use
the Trainer's own train_runtime on both sides. Goal: crofter / plain >= 1.0 for both.

    python bench/bench_rlhf.py --hf DIR [--reward-steps 20] [--grpo-steps 6] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The reward both GRPO sides use: 1 when the reply opens with "The".
REWARD_FN = """
def opens_with_the(prompts, completions, **kw):
    text = lambda c: c if isinstance(c, str) else c[-1]["content"]
    return [1.0 if text(c).lstrip().startswith("The ") else 0.0 for c in completions]
"""

CROFTER_REWARD = r"""
import json, sys
from pathlib import Path
from finetune.recipe import load_recipe
from finetune.rlhf import reward
hf, data, out, steps = sys.argv[1:5]
r = load_recipe("reward").replace(batch_size=4, grad_accum=1, learning_rate=1e-4, eval_split=0.0, save_steps=10_000,
                                  gradient_checkpointing=False, warmup_ratio=0.0, max_length=256, center_rewards=0.0)
s = reward(Path(hf), Path(data), Path(out), r, max_steps=int(steps))
print(json.dumps({"seconds": s.train_runtime, "steps": s.steps}))
"""

PLAIN_REWARD = r"""
import json, sys, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer
hf, data, out, steps = sys.argv[1:5]
rows = [json.loads(l) for l in open(data)]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                         "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1, dtype=torch.float32)
args = RewardConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-4,
                    max_steps=int(steps), logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    gradient_checkpointing=False, max_length=256, seed=42, dataloader_num_workers=0, bf16=False)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="SEQ_CLS")
t = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
o = t.train()
print(json.dumps({"seconds": o.metrics["train_runtime"], "steps": t.state.global_step}))
"""

CROFTER_GRPO = r"""
import json, sys
from pathlib import Path
from finetune.recipe import load_recipe
from finetune.rlhf import grpo
hf, prompts, out, steps, fn = sys.argv[1:6]
r = load_recipe("grpo").replace(batch_size=4, grad_accum=1, learning_rate=1e-4, save_steps=10_000, beta=0.04,
                                gradient_checkpointing=False, warmup_ratio=0.0, num_generations=4,
                                max_completion_length=16)
s = grpo(Path(hf), Path(prompts), Path(out), r, reward=f"python:{fn}:opens_with_the", max_steps=int(steps))
print(json.dumps({"seconds": s.train_runtime, "steps": s.steps}))
"""

PLAIN_GRPO = r"""
import json, sys, torch, importlib.util
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
hf, prompts, out, steps, fn = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("rf", fn); mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": l.strip()}]} for l in open(prompts) if l.strip()])
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-4,
                  max_steps=int(steps), logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  gradient_checkpointing=False, seed=42, dataloader_num_workers=0, bf16=False, beta=0.04,
                  num_generations=4, max_completion_length=16, temperature=1.0, top_p=1.0, log_completions=False)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
t = GRPOTrainer(model=model, reward_funcs=mod.opens_with_the, args=args, train_dataset=ds, processing_class=tok,
                peft_config=peft)
o = t.train()
print(json.dumps({"seconds": o.metrics["train_runtime"], "steps": t.state.global_step}))
"""

QA = [("What is the capital of France?", "Paris."), ("How do plants grow?", "With light, water and soil."),
      ("Name a primary color.", "Red."), ("Why is the sky blue?", "Rayleigh scattering of sunlight."),
      ("What do bees make?", "Honey, from the nectar of flowers."), ("Who wrote Hamlet?", "William Shakespeare.")]


def child(code: str, *argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def pair(ours: str, plain: str, argv: list[str], steps: int, rounds: int, tmp: str, label: str, unit: str, per: int,
         tail: tuple = ()) -> None:
    """`per`: samples per step (pairs for the reward model; 1 for GRPO's steps)."""
    child(plain, *argv, f"{tmp}/warm-plain-{label}", "2", *tail)
    child(ours, *argv, f"{tmp}/warm-ours-{label}", "2", *tail)
    ratios = []
    for i in range(rounds):  # who runs first alternates, so neither side always follows the other
        run_p = lambda: child(plain, *argv, f"{tmp}/plain-{label}{i}", str(steps), *tail)  # noqa: E731
        run_o = lambda: child(ours, *argv, f"{tmp}/ours-{label}{i}", str(steps), *tail)  # noqa: E731
        if i % 2:
            o, p = run_o(), run_p()
        else:
            p, o = run_p(), run_o()
        rate_p, rate_o = p["steps"] * per / p["seconds"], o["steps"] * per / o["seconds"]
        ratios.append(rate_o / rate_p)
        print(f"{label} round {i + 1}: crofter {rate_o:.3f} {unit} ({o['seconds']:.0f} s), plain TRL {rate_p:.3f} {unit} "
              f"({p['seconds']:.0f} s), ratio {ratios[-1]:.3f}")
    import statistics

    print(f"{label} ratio crofter/plain: mean {sum(ratios) / len(ratios):.3f}, median {statistics.median(ratios):.3f} "
          f"over {len(ratios)} rounds (goal >= 1.0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, required=True)
    ap.add_argument("--reward-steps", type=int, default=20)
    ap.add_argument("--grpo-steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prefs, prompts, fn = Path(tmp) / "prefs.jsonl", Path(tmp) / "prompts.txt", Path(tmp) / "rf.py"
        prefs.write_text("".join(json.dumps({"prompt": q, "chosen": f"Arr matey! {a}", "rejected": a}) + "\n"
                                 for q, a in QA * 10))
        prompts.write_text("".join(q + "\n" for q, _ in QA * 4))
        fn.write_text(REWARD_FN)
        pair(CROFTER_REWARD, PLAIN_REWARD, [str(args.hf), str(prefs)], args.reward_steps, args.rounds, tmp,
             "reward", "pairs/s", 4)
        pair(CROFTER_GRPO, PLAIN_GRPO, [str(args.hf), str(prompts)], args.grpo_steps, args.rounds, tmp,
             "grpo", "steps/s", 1, (str(fn),))


if __name__ == "__main__":
    main()

"""The arguments of `crofter tune sft | dpo | reward | grpo | merge` (argparse only; the work is in tune.py)."""
from __future__ import annotations

RECIPES = {"pretrain": "pretrain", "sft": "lora", "dpo": "dpo", "reward": "reward", "grpo": "grpo"}
ACTIONS = (
    ("pretrain", "pre-train on your own text (files or folders), continuing a model or from scratch, giving a new base",
     "Pre-training on your own text: documents (deduplicated by content) are cut into max-length blocks, each "
     "ended with the end-of-text token; held-out perplexity is measured before and after. Continuing a --base, "
     "LoRA is trained on every token and merged into RUN/model (--full trains every weight). From scratch, "
     "--from-config gpt2|llama|FILE.json with --size and --tokenizer builds a new model and trains all of it. "
     "RUN/model is the new base for `tune sft --base RUN/model`."),
    ("sft", "supervised fine-tuning on chat data (alpaca, ShareGPT or OpenAI messages)",
     "Supervised fine-tuning on chat data (alpaca, ShareGPT or OpenAI messages); the loss is on the assistant's tokens."),
    ("dpo", "preference tuning on prompt/chosen/rejected pairs",
     "Preference tuning (DPO) on prompt/chosen/rejected pairs, e.g. from `crofter chats export --prefs`."),
    ("reward", "train a reward model on prompt/chosen/rejected pairs (RLHF's second stage)",
     "Train a reward model (TRL RewardTrainer): the base with LoRA and a one-output score head, Bradley-Terry "
     "loss on prompt/chosen/rejected pairs. Held-out pair accuracy and reward margin are logged and reported; "
     "recipe key center_rewards pulls the mean reward to 0. Its run folder is what `tune grpo --reward` takes."),
    ("grpo", "reinforcement learning (GRPO) on prompts, scored by a reward model or a Python function",
     "GRPO (TRL GRPOTrainer), RLHF's third stage: for each prompt, num_generations completions are sampled and "
     "scored, and the model moves towards the better ones of each group, held near the starting model by a KL "
     "term (recipe key beta). Mean reward and KL are logged to loss.csv and plotted. PPO is not offered: TRL 1.x "
     "has no PPOTrainer; GRPO needs no value model and is what TRL maintains."),
)


def _common(t, kind: str) -> None:
    t.add_argument("--recipe", default=RECIPES[kind], metavar="NAME|FILE",
                   help=f"training recipe (default: {RECIPES[kind]})")
    t.add_argument("--out", metavar="DIR", help="run folder (default: <data dir>/runs/DATE-KIND)")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    t.add_argument("--epochs", type=float, metavar="E")
    t.add_argument("--lr", type=float, metavar="LR", help="learning rate")
    t.add_argument("--batch-size", type=int, metavar="N")
    if kind == "grpo":
        t.add_argument("--num-generations", type=int, metavar="G", help="completions sampled per prompt (recipe default 4)")
        t.add_argument("--max-completion-length", type=int, metavar="TOKENS", help="longest completion sampled")
    else:
        t.add_argument("--max-length", type=int, metavar="TOKENS",
                       help="longer examples are truncated (sft, counted) or dropped (dpo, reward)")
        t.add_argument("--eval-split", type=float, metavar="F", help="fraction held out for eval loss (0: none)")
    t.add_argument("--qlora", action="store_true", help="4-bit NF4 base through bitsandbytes (CUDA)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete checkpoint")
    t.add_argument("--launcher", choices=("none", "accelerate"), default="none",
                   help="accelerate: run on several GPUs with `accelerate launch`")
    t.add_argument("--gpus", type=int, default=2, metavar="N", help="processes for --launcher accelerate (default 2)")
    t.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="multi-GPU strategy (default ddp)")
    t.add_argument("--dry-run", action="store_true", help="with --launcher: write the config and print the command only")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_parser(sub) -> None:
    tune = sub.add_parser("tune", help="fine-tune an HF checkpoint: continued pre-training, LoRA/QLoRA SFT, DPO, reward model, GRPO, merge",
                          description="Fine-tuning with transformers, peft and TRL. Runs on CUDA when present (bf16 "
                          "where supported), else on CPU. Each run folder holds config.json, checkpoints/, adapter/, "
                          "loss.csv and loss.png.")
    tsub = tune.add_subparsers(dest="tune_command", metavar="ACTION", required=True)
    for kind, text, description in ACTIONS:
        t = tsub.add_parser(kind, help=text, description=description,
                            epilog="Recipes: pretrain, lora, qlora, dpo, reward, grpo (finetune/configs/) or a YAML file with "
                            "the same keys." + (GRPO_EPILOG if kind == "grpo" else ""))
        t.add_argument("--base", required=kind != "pretrain", metavar="MODEL",
                       help="HF checkpoint folder or store name" + (" (or --from-config to start from scratch)"
                                                                    if kind == "pretrain" else ""))
        if kind == "grpo":
            t.add_argument("--prompts", required=True, metavar="FILE",
                           help="prompts: a .txt file (one per line) or JSONL with \"prompt\" (text or messages)")
            t.add_argument("--reward", required=True, metavar="RUN|python:MODULE:FUNC",
                           help="a `crofter tune reward` run folder, or a Python function "
                           "FUNC(prompts, completions, **kwargs) -> list of numbers (MODULE: a module or a .py file)")
        elif kind == "pretrain":
            t.add_argument("--text", "--data", dest="text", nargs="+", required=True, metavar="PATH",
                           help="files or folders of your text: txt, md, rst, html, pdf, docx, code (read as "
                           "`crofter ingest` reads them); a text found twice is used once")
            m = t.add_mutually_exclusive_group()
            m.add_argument("--lora", action="store_true", help="LoRA on every linear layer, merged at the end (the default)")
            m.add_argument("--full", action="store_true", help="train every weight (more memory; what a run from scratch does)")
            g = t.add_argument_group("from scratch")
            g.add_argument("--from-config", metavar="gpt2|llama|FILE.json",
                           help="a new, randomly initialised model: GPT-2 124M's shape, SmolLM2-135M's Llama, or a config.json")
            g.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                           help="change one setting of --from-config, e.g. n_layer=4 n_embd=256 (repeatable)")
            g.add_argument("--tokenizer", metavar="DIR", help="the tokenizer folder of a model from scratch (its vocabulary sizes the model)")
            t.add_argument("--name", help="store name for RUN/model (default: from the run folder's name)")
            t.add_argument("--no-register", action="store_true", help="do not add RUN/model to the model store")
        else:
            t.add_argument("--data", required=True, metavar="FILE", help="JSONL or JSON training data")
        if kind in ("dpo", "grpo"):
            t.add_argument("--adapter", metavar="DIR",
                           help="start from this SFT (or DPO) adapter or run folder (the reference is a frozen copy)")
        _common(t, kind)
    tm = tsub.add_parser("merge", help="adapter + base -> a full checkpoint (safetensors), registered in the store")
    tm.add_argument("--base", required=True, metavar="MODEL")
    tm.add_argument("--adapter", required=True, metavar="DIR")
    tm.add_argument("--out", required=True, metavar="DIR")
    tm.add_argument("--name", help="store name (default: from --out)")
    tm.add_argument("--no-register", action="store_true")
    tm.add_argument("--json", action="store_true")


GRPO_EPILOG = ("  Example: crofter tune reward --base HF --data prefs.jsonl --out runs/rm && crofter tune grpo "
               "--base HF --adapter runs/sft --prompts prompts.txt --reward runs/rm")

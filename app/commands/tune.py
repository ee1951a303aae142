"""`crofter tune sft | dpo | reward | grpo | merge`: fine-tune a local HF checkpoint, then merge the adapter."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..errors import CLIError


def _resolve_base(name: str) -> Path:
    from models.registry import Registry

    return Registry().resolve_kind(name, "hf", "training needs an HF checkpoint folder (safetensors)")


def _run_dir(args, kind: str) -> Path:
    if args.out:
        return Path(args.out).expanduser()
    from models import paths

    return paths.data_dir() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def _recipe(args):
    from finetune.recipe import load_recipe

    r = load_recipe(args.recipe)
    return r.replace(qlora=True if getattr(args, "qlora", False) else None, learning_rate=args.lr,
                     eval_split=getattr(args, "eval_split", None), max_length=getattr(args, "max_length", None),
                     batch_size=args.batch_size, num_generations=getattr(args, "num_generations", None),
                     max_completion_length=getattr(args, "max_completion_length", None))


def accelerate_config(run_dir: Path, gpus: int, strategy: str) -> Path:
    """Write the accelerate config for `gpus` processes: DDP, or FSDP (full shard) for larger models."""
    from models.atomic import write_text

    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if strategy == "fsdp" else "MULTI_GPU",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": gpus,
        "gpu_ids": "all",
        "mixed_precision": "bf16",
        "use_cpu": False,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
    }
    if strategy == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": False,
        }
    path = run_dir / "accelerate.yaml"
    import yaml

    write_text(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


def launch_command(config: Path, argv: list[str]) -> list[str]:
    """`accelerate launch` running this same crofter command (without --launcher) in every process."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--launcher", "--gpus", "--strategy"):
            skip = True
            continue
        if a.startswith(("--launcher=", "--gpus=", "--strategy=")) or a == "--dry-run":
            continue
        rest.append(a)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "app.cli", *rest]


def _summary(args, s) -> None:
    d = s.as_dict()
    if args.json:
        print(json.dumps(d))
        return
    from rich.console import Console

    con = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
    unit = {"dpo": "pairs", "reward": "pairs", "grpo": "prompts", "pretrain": "blocks"}.get(s.kind, "examples")
    con.print(f"{s.kind.upper()} done: {s.steps} steps in {s.seconds:.0f} s on {s.examples} {unit}")
    if s.train_loss is not None:
        con.print(f"  final train loss   {s.train_loss:.4f}")
    if s.eval_loss is not None:
        ppl = f" (perplexity {s.eval_perplexity:.2f})" if s.eval_perplexity else ""
        con.print(f"  eval loss          {s.eval_loss:.4f}{ppl}")
    if s.tokens_per_s:
        con.print(f"  throughput         {s.tokens_per_s:.0f} tokens/s")
    if s.truncated:
        con.print(f"  truncated          {s.truncated} examples longer than max_length")
    for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "accuracy", "margin"):
        for key in (f"eval_{k}", k):
            if key in s.metrics:
                con.print(f"  {key:18} {s.metrics[key]:.4f}" + ("  (held-out pairs)" if key.startswith("eval_") and
                                                                 s.kind == "reward" else ""))
                break
    if s.kind == "grpo" and s.metrics.get("reward_first") is not None:
        con.print(f"  mean reward        {s.metrics['reward_first']:.4f} (first step) -> {s.metrics['reward_last']:.4f} (last)")
        if s.metrics.get("kl") is not None:
            con.print(f"  KL to reference    {s.metrics['kl']:.4f}")
    con.print(f"  adapter            {s.adapter}")
    con.print(f"  loss curve         {s.run_dir / 'loss.png'} (and loss.csv)")
    con.print(f"  config             {s.run_dir / 'config.json'}")
    if s.kind == "pretrain":
        before, after = s.metrics.get("held_out_perplexity_before"), s.metrics.get("held_out_perplexity")
        if before is not None and after is not None:
            con.print(f"  held-out PPL       {before:.2f} -> {after:.2f}")
        if s.metrics.get("duplicates"):
            con.print(f"  duplicates         {s.metrics['duplicates']} documents with a text seen before, left out")
        name = s.metrics.get("registered_as")
        con.print(f"  {'model' if s.metrics.get('full') else 'merged model':18} {s.metrics['model']}"
                  + (f" (registered as {name})" if name else ""))
        con.print(f"next: crofter tune sft --base {name or s.metrics['model']} --data chat.jsonl   "
                  f"(or crofter convert {name or s.metrics['model']})")
    elif s.kind == "reward":
        con.print(f"next: crofter tune grpo --base BASE --prompts FILE --reward {s.run_dir}")
    else:
        con.print(f"next: crofter tune merge --base BASE --adapter {s.run_dir} --out DIR")


def run(args) -> int:
    if args.tune_command == "merge":
        return _merge(args)
    from finetune.data import DataError
    from finetune.recipe import RecipeError
    from finetune.train import TrainError

    if args.tune_command == "pretrain":
        _check_scratch(args)
    base = _resolve_base(args.base) if args.base else None
    run_dir = _run_dir(args, args.tune_command)
    if args.launcher == "accelerate":
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = accelerate_config(run_dir, args.gpus, args.strategy)
        argv = list(args.argv) if getattr(args, "argv", None) else sys.argv[1:]
        if not args.out:  # every process must write the same run folder
            argv = [*argv, "--out", str(run_dir)]
        cmd = launch_command(cfg, argv)
        print(f"crofter: {shlex.join(cmd)}", file=sys.stderr)
        if args.dry_run:
            return 0
        return subprocess.call(cmd, env={**os.environ})
    import contextlib

    try:
        recipe = _recipe(args)
        from finetune import train

        kw = dict(max_steps=args.max_steps, epochs=args.epochs, resume=args.resume)
        # The Trainer prints its log dicts to stdout; keep stdout for the summary (--json).
        with contextlib.redirect_stdout(sys.stderr):
            s = _train(train, args, base, run_dir, recipe, kw)
    except (DataError, RecipeError, TrainError) as exc:
        raise CLIError(str(exc)) from None
    if s.kind == "pretrain" and not args.no_register:  # a new base: `crofter convert NAME`, `--base NAME`
        from models.registry import ModelError, Registry, slug

        try:
            s.metrics["registered_as"] = Registry().add(s.metrics["model"], args.name or slug(run_dir.name),
                                                        source="pretrained").name
        except ModelError as exc:
            raise CLIError(f"{s.metrics['model']} is complete but was not registered: {exc}") from None
    _summary(args, s)
    return 0


def _check_scratch(args) -> None:
    """pretrain: a --base to continue, or --from-config with its --tokenizer, not both."""
    if bool(args.base) == bool(args.from_config):
        raise CLIError("tune pretrain: give --base MODEL to continue a model, or --from-config to start one from scratch")
    if args.from_config and not args.tokenizer:
        raise CLIError("--from-config: name the tokenizer folder with --tokenizer DIR")
    if (args.size or args.tokenizer) and not args.from_config:
        raise CLIError(f"{'--size' if args.size else '--tokenizer'}: only with --from-config (a model from scratch)")
    if args.qlora and (args.full or args.from_config):
        raise CLIError("--qlora: a 4-bit base trains through LoRA only; drop --full / --from-config, or --qlora")
    if args.from_config and args.lora:
        raise CLIError("--lora: a model from scratch trains every weight")
    for kv in args.size:
        if "=" not in kv or not kv.split("=", 1)[0]:
            raise CLIError(f"--size {kv}: write KEY=VALUE, e.g. n_layer=4")


def _train(train, args, base, run_dir, recipe, kw):
    if args.tune_command == "sft":
        return train.sft(base, Path(args.data), run_dir, recipe, **kw)
    if args.tune_command == "pretrain":
        from finetune.pretrain import pretrain, scratch_model

        from .texts import read_documents

        docs = read_documents(args.text)
        if args.from_config:  # a new model, made once per run folder (a resumed run keeps its own)
            init = run_dir / "init"
            if not (args.resume and init.is_dir()):
                sizes = dict(kv.split("=", 1) for kv in args.size)
                scratch_model(args.from_config, sizes, Path(args.tokenizer).expanduser(), init, seed=recipe.seed)
            base = init
        return pretrain(base, docs, run_dir, recipe, full=bool(args.full or args.from_config), **kw)
    if args.tune_command == "reward":
        from finetune import rlhf

        return rlhf.reward(base, Path(args.data), run_dir, recipe, **kw)
    adapter = Path(args.adapter).expanduser() if args.adapter else None  # an adapter or a run folder
    if args.tune_command == "grpo":
        from finetune import rlhf

        return rlhf.grpo(base, Path(args.prompts), run_dir, recipe, reward=args.reward, adapter=adapter, **kw)
    return train.dpo(base, Path(args.data), run_dir, recipe, adapter=adapter, **kw)


def _merge(args) -> int:
    from finetune.train import TrainError, merge

    base = _resolve_base(args.base)
    try:
        out = merge(base, Path(args.adapter).expanduser(), Path(args.out).expanduser())
    except TrainError as exc:
        raise CLIError(str(exc)) from None
    name = None
    if not args.no_register:
        from models.registry import Registry, slug

        name = Registry().add(out, args.name or slug(out.name), source="merged").name
    if args.json:
        print(json.dumps({"path": str(out), "registered_as": name}))
    else:
        print(f"merged into {out}" + (f" (registered as {name})" if name else ""), file=sys.stderr)
        print(f"next: crofter convert {name or out}   (then crofter quantize ... --type Q4_K_M)", file=sys.stderr)
    return 0

"""SFT and DPO with LoRA/QLoRA through TRL and peft, and merging an adapter into its base.

A run folder holds everything a run produced::

    RUN/config.json          the resolved recipe, base, data and device
    RUN/checkpoints/         Trainer checkpoints (resume picks the last complete one)
    RUN/adapter/             the final LoRA adapter (appears only when complete)
    RUN/loss.csv, loss.png   the loss curve (and DPO rewards), written as training goes

Device: CUDA when present (bf16 where supported, else fp16), otherwise CPU in fp32.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from models.adapters import checkpoint_step, last_complete_checkpoint, resolve_adapter
from models.atomic import atomic_dir, sweep_stale_partial_dirs

from .curve import CurveLogger
from .data import (
    PLAIN_TEMPLATE,
    DataError,
    encode_conversation,
    load_preferences,
    load_sft,
)
from .recipe import Recipe


class TrainError(Exception):
    """A training run cannot start or continue; the message says what to do."""


@dataclass
class RunSummary:
    kind: str
    run_dir: Path
    adapter: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    tokens_per_s: float | None = None
    seconds: float = 0.0
    truncated: int = 0
    examples: int = 0
    metrics: dict = field(default_factory=dict)  # DPO: rewards/accuracies, margins... (last eval, else last train log)
    train_runtime: float | None = None  # the Trainer's own time in its training loop (seconds: the whole call)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["run_dir"], d["adapter"] = str(self.run_dir), str(self.adapter)
        return d


def device_info() -> dict:
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"device": "cuda", "gpus": torch.cuda.device_count(), "bf16": bf16, "fp16": not bf16,
                "name": torch.cuda.get_device_name(0)}
    return {"device": "cpu", "gpus": 0, "bf16": False, "fp16": False, "name": "cpu"}


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def load_base(base: Path, recipe: Recipe, dev: dict, head: str = "causal"):
    """(model, tokenizer) for training; QLoRA loads the base in 4-bit NF4. head="score": the base
    with a one-output score head instead of its LM head (a reward model; the head starts random)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        if tok.eos_token is None:
            raise TrainError(f"{base}: the tokenizer has neither a chat template nor an end-of-text token to end turns with")
        # A base model (GPT-2, a nanoGPT import): train it on plain-text role markers. The adapter and
        # the merged model save this tokenizer, template included, so the converted GGUF chats with it.
        tok.chat_template = PLAIN_TEMPLATE
        print(f"crofter: {base} has no chat template; using a plain-text one (<|user|> / <|assistant|> markers, "
              f"turns end with {tok.eos_token}), saved with the adapter", file=sys.stderr)
    kwargs: dict = {"local_files_only": True}
    if recipe.qlora:
        if dev["device"] != "cuda":
            raise TrainError("QLoRA (4-bit base through bitsandbytes) needs a CUDA GPU and none is present here; "
                             "run without --qlora for plain LoRA, which works on CPU")
        import importlib.util

        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainError("QLoRA needs bitsandbytes: pip install bitsandbytes (or run without --qlora)")
        compute = torch.bfloat16 if dev["bf16"] else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
    else:
        kwargs["dtype"] = torch.bfloat16 if dev["bf16"] else torch.float32
    if head == "score":
        from transformers import set_seed

        set_seed(recipe.seed)  # the score head is initialised at random: the same seed gives the same run
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, **kwargs)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    if recipe.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    return model, tok


# GPT-2's layers are HF Conv1D (weights stored (in, out)): peft needs fan_in_fan_out for them.
CONV1D_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def lora_config(recipe: Recipe, model_type: str | None = None, task: str = "CAUSAL_LM"):
    """task="SEQ_CLS" (a reward model): peft also trains and saves the score head in full."""
    from peft import LoraConfig

    targets, conv1d = recipe.target_modules, model_type in CONV1D_TARGETS
    if conv1d and targets == "all-linear":
        targets = CONV1D_TARGETS[model_type]
    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      use_rslora=recipe.use_rslora, target_modules=targets, task_type=task,
                      bias="none", fan_in_fan_out=conv1d)


def _training_args(cls, recipe: Recipe, run_dir: Path, dev: dict, has_eval: bool, max_steps: int | None,
                   epochs: float | None, **extra):
    args = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        num_train_epochs=epochs if epochs is not None else recipe.epochs,
        max_steps=max_steps if max_steps is not None else recipe.max_steps,
        warmup_steps=0,
        weight_decay=recipe.weight_decay,
        lr_scheduler_type=recipe.lr_scheduler,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=3,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.save_steps if has_eval else None,
        gradient_checkpointing=recipe.gradient_checkpointing,
        bf16=dev["bf16"],
        fp16=dev["fp16"] and not recipe.qlora,
        use_cpu=dev["device"] == "cpu",
        report_to=[],
        seed=recipe.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **extra,
        **recipe.extra,
    )
    if recipe.warmup_ratio:
        args["warmup_steps"] = recipe.warmup_ratio if recipe.warmup_ratio < 1 else int(recipe.warmup_ratio)
    return cls(**args)


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(items) < 10:
        return items, []
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(items) * fraction))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _prepare_run(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to mix a fresh run into a folder with one.

    On resume, checkpoints newer than the last complete one (cut short by a kill) are deleted, and
    the loss curve is cut back to that checkpoint's step, so the run's step count only grows."""
    ckpt = last_complete_checkpoint(run_dir / "checkpoints")
    if resume:
        if ckpt is None:
            raise TrainError(f"{run_dir}: no complete checkpoint to resume from")
        step = checkpoint_step(ckpt)
        for d in (run_dir / "checkpoints").iterdir():
            if (checkpoint_step(d) or 0) > step:
                shutil.rmtree(d, ignore_errors=True)
        CurveLogger.truncate(run_dir, step)
        return ckpt
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise TrainError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("loss.csv", "loss.png"):
        (run_dir / stale).unlink(missing_ok=True)
    return None


def _save_adapter(trainer, run_dir: Path, **save_kw) -> Path:
    final = run_dir / "adapter"
    with atomic_dir(final, replace=True) as tmp:
        trainer.model.save_pretrained(str(tmp), **save_kw)
        trainer.processing_class.save_pretrained(str(tmp))
    return final


def _fit(trainer, curve: CurveLogger, run_dir: Path, ckpt: Path | None, evaluate: bool, **save_kw):
    """Train (resuming from `ckpt`), save the adapter atomically, evaluate, plot the curve:
    (train output, seconds, adapter folder, eval metrics or {})."""
    t0 = time.monotonic()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    seconds = time.monotonic() - t0
    adapter = _save_adapter(trainer, run_dir, **save_kw)
    ev = trainer.evaluate() if evaluate else {}
    curve.plot()
    return out, seconds, adapter, ev


def _write_config(run_dir: Path, **info) -> None:
    from models.atomic import write_text

    write_text(run_dir / "config.json", json.dumps(info, indent=2, default=str))


def sft(base: Path, data: Path, run_dir: Path, recipe: Recipe, *, max_steps: int | None = None,
        epochs: float | None = None, resume: bool = False, on_log: Callable[[dict], None] | None = None) -> RunSummary:
    """LoRA (or QLoRA) SFT with TRL's SFTTrainer; loss only on assistant tokens."""
    _quiet()
    conversations = load_sft(data)
    ckpt = _prepare_run(run_dir, resume)
    dev = device_info()
    model, tok = load_base(base, recipe, dev)
    # Never past the model's positions (GPT-2's learned position table has no row beyond them).
    max_length = min(recipe.max_length, getattr(model.config, "max_position_embeddings", None) or recipe.max_length)
    rows, truncated = [], 0
    for i, msgs in enumerate(conversations):
        try:
            ids, mask, cut = encode_conversation(tok, msgs, max_length)
        except DataError as exc:
            raise DataError(f"{data.name} record {i + 1}: {exc}") from None
        truncated += cut
        if any(mask):
            rows.append({"input_ids": ids, "assistant_masks": mask})
    if not rows:
        raise TrainError(f"{data}: every example lost its answer to --max-length {max_length}")
    train_rows, eval_rows = _split(rows, recipe.eval_split, recipe.seed)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = _training_args(SFTConfig, recipe, run_dir, dev, bool(eval_rows), max_steps, epochs,
                          packing=recipe.packing, max_length=max_length, dataset_num_proc=None)
    _write_config(run_dir, kind="sft", base=str(base), data=str(data), recipe=recipe.as_dict(), device=dev,
                  examples=len(rows), truncated=truncated, max_steps=args.max_steps, epochs=args.num_train_epochs)
    curve = CurveLogger(run_dir, on_log)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tok,
                         peft_config=lora_config(recipe, model.config.model_type), callbacks=[curve.callback])
    out, seconds, adapter, ev = _fit(trainer, curve, run_dir, ckpt, bool(eval_rows))
    # TRL logs the tokens it trained on as num_tokens; older versions did not.
    tokens = float(curve.last.get("num_tokens") or 0) or _count_tokens(train_rows, trainer.state)
    train_time = out.metrics.get("train_runtime") or seconds  # the Trainer's own clock, as TRL reports it
    eval_loss = ev.get("eval_loss")
    return RunSummary("sft", run_dir, adapter, trainer.state.global_step, out.training_loss, eval_loss,
                      math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
                      tokens / train_time if tokens and train_time else None, seconds, truncated, len(rows),
                      train_runtime=out.metrics.get("train_runtime"))


def _count_tokens(rows: list[dict], state) -> int:
    """Tokens seen when the Trainer did not count them: epochs run times the data's tokens."""
    per_epoch = sum(len(r["input_ids"]) for r in rows)
    return int(per_epoch * (state.epoch or 0))


def dpo(base: Path, data: Path, run_dir: Path, recipe: Recipe, *, adapter: Path | None = None,
        max_steps: int | None = None, epochs: float | None = None, resume: bool = False,
        on_log: Callable[[dict], None] | None = None) -> RunSummary:
    """DPO with TRL's DPOTrainer. The reference model is the policy with its trainable adapter
    off (a base) or a frozen copy of the starting adapter (an SFT adapter): never a second model."""
    adapter = policy_adapter(adapter) if adapter is not None else None  # before anything heavy
    _quiet()
    pairs = load_preferences(data)
    ckpt = _prepare_run(run_dir, resume)
    dev = device_info()
    model, tok, peft_config = policy_model(base, recipe, dev, adapter)
    train_rows, eval_rows = _split(pairs, recipe.eval_split, recipe.seed)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    losses = [recipe.loss_type] + (["sft"] if recipe.sft_weight > 0 else [])
    weights = [1.0, recipe.sft_weight] if recipe.sft_weight > 0 else None
    args = _training_args(DPOConfig, recipe, run_dir, dev, bool(eval_rows), max_steps, epochs, beta=recipe.beta,
                          loss_type=losses, loss_weights=weights, max_length=recipe.max_length)
    _write_config(run_dir, kind="dpo", base=str(base), adapter=str(adapter) if adapter else None, data=str(data),
                  recipe=recipe.as_dict(), device=dev, pairs=len(pairs), max_steps=args.max_steps)
    curve = CurveLogger(run_dir, on_log)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tok,
                         peft_config=peft_config, callbacks=[curve.callback])
    out, seconds, saved, ev = _fit(trainer, curve, run_dir, ckpt, bool(eval_rows))
    metrics = {k: v for k, v in {**curve.last, **ev}.items() if "rewards/" in k or "logps/" in k}
    eval_loss = ev.get("eval_loss")
    return RunSummary("dpo", run_dir, saved, trainer.state.global_step, out.training_loss, eval_loss, None,
                      None, seconds, 0, len(pairs), metrics, out.metrics.get("train_runtime"))


def policy_model(base: Path, recipe: Recipe, dev: dict, adapter: Path | None):
    """(model, tokenizer, peft_config) for preference or RL training: a fresh LoRA on the base, or
    the given adapter trained further (peft_config None: the trainer must not add another)."""
    model, tok = load_base(base, recipe, dev)
    if adapter is None:
        return model, tok, lora_config(recipe, model.config.model_type)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True), tok, None


def policy_adapter(path: Path) -> Path:
    """resolve_adapter, refusing a reward model's adapter (a score head, not a chat model's)."""
    found = resolve_adapter(path)
    try:
        task = json.loads((found / "adapter_config.json").read_text()).get("task_type")
    except (OSError, ValueError, AttributeError):
        task = None
    if task == "SEQ_CLS":
        raise TrainError(f"{path}: a reward model's adapter (it scores replies, it does not write them); "
                         "give it to `crofter tune grpo --reward`")
    return found


def merge(base: Path, adapter: Path, out: Path) -> Path:
    """Adapter (or the run folder holding it) + base -> a full HF checkpoint (safetensors) at `out`.

    `out` appears only when complete: it is written as a temp folder next to it and renamed; a
    write error (disk full) removes the temp and raises TrainError, a kill leaves a temp that
    the next merge into that folder sweeps. The base is loaded in 16/32-bit, never 4-bit: a
    QLoRA adapter merges into the dequantized weights (merging into NF4 loses its precision)."""
    adapter = policy_adapter(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if out.exists():
        raise TrainError(f"{out} exists; choose a new --out")
    sweep_stale_partial_dirs(out)
    _quiet()
    import torch
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    try:
        with atomic_dir(out) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True).save_pretrained(str(tmp))
            (tmp / "crofter_merge.json").write_text(json.dumps({
                "base": str(base), "adapter": str(adapter),
                "adapter_base_recorded": cfg.get("base_model_name_or_path")}, indent=2))
    except FileExistsError:
        raise TrainError(f"{out} appeared while merging; choose a new --out") from None
    except (OSError, SafetensorError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TrainError(f"{out}: writing the merged model failed ({why}); nothing was left there") from None
    return out

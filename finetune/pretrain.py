"""Continued pre-training on the user's own text: `crofter tune pretrain --base HF --text FILE|DIR`.

The text (a file, or every .txt/.md file under a folder) is tokenized, each document ended with
the tokenizer's end-of-text token, concatenated and cut into blocks of `max_length` tokens; a
fraction of the blocks (`eval_split`, taken whole from the end of the stream so no held-out text
leaks into training through a shared block) measures held-out perplexity before and after.
Training is LoRA on every linear layer through TRL's SFTTrainer with the loss on every token; at
the end the adapter is merged into a full checkpoint at RUN/model, which is the new base for
`tune sft` (and what a journey's next stage starts from).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from .curve import CurveLogger
from .data import DataError
from .recipe import Recipe
from .train import (
    RunSummary,
    TrainError,
    _fit,
    _prepare_run,
    _quiet,
    _training_args,
    _write_config,
    device_info,
    load_base,
    lora_config,
    merge,
)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def text_files(path: Path) -> list[Path]:
    """The files a --text path means, sorted; errors name the path."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not found:
            raise DataError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) under this folder")
        return found
    raise DataError(f"{path}: no such file or folder")


def blocks(tokenizer, files: list[Path], size: int) -> list[list[int]]:
    """Every document tokenized and ended with EOS, concatenated, cut into `size`-token blocks
    (the tail shorter than a block is dropped unless it is all there is)."""
    if tokenizer.eos_token_id is None:
        raise TrainError("the tokenizer has no end-of-text token to separate documents with")
    stream: list[int] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if text.strip():
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not stream:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: the text is empty")
    out = [stream[i:i + size] for i in range(0, len(stream), size)]
    if len(out) > 1 and len(out[-1]) < size:
        out.pop()
    return out


def pretrain(base: Path, text: Path, run_dir: Path, recipe: Recipe, *, max_steps: int | None = None,
             epochs: float | None = None, resume: bool = False,
             on_log: Callable[[dict], None] | None = None) -> RunSummary:
    """Continued pre-training; metrics hold the held-out perplexity before and after, and RUN/model."""
    files = text_files(text)
    _quiet()
    ckpt = _prepare_run(run_dir, resume)
    if (run_dir / "model").exists():
        raise TrainError(f"{run_dir / 'model'} exists: this run was merged already; choose another --out")
    dev = device_info()
    model, tok = load_base(base, recipe, dev)
    size = min(recipe.max_length, getattr(model.config, "max_position_embeddings", None) or recipe.max_length)
    rows = [{"input_ids": b} for b in blocks(tok, files, size)]
    n_eval = max(1, int(len(rows) * recipe.eval_split)) if recipe.eval_split > 0 and len(rows) > 1 else 0
    train_rows, eval_rows = (rows[:-n_eval], rows[-n_eval:]) if n_eval else (rows, [])
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = _training_args(SFTConfig, recipe, run_dir, dev, bool(eval_rows), max_steps, epochs,
                          packing=False, max_length=size, dataset_num_proc=None, completion_only_loss=False)
    _write_config(run_dir, kind="pretrain", base=str(base), text=[str(f) for f in files], recipe=recipe.as_dict(),
                  device=dev, blocks=len(rows), block_tokens=size, held_out_blocks=len(eval_rows),
                  max_steps=args.max_steps)
    curve = CurveLogger(run_dir, on_log)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tok,
                         peft_config=lora_config(recipe, model.config.model_type), callbacks=[curve.callback])
    before = trainer.evaluate().get("eval_loss") if eval_rows and ckpt is None else None
    out, seconds, adapter, ev = _fit(trainer, curve, run_dir, ckpt, bool(eval_rows))
    del trainer, model
    merged = merge(base, adapter, run_dir / "model")
    train_time = out.metrics.get("train_runtime") or seconds
    tokens = float(curve.last.get("num_tokens") or 0)
    ppl = (lambda loss: math.exp(loss) if loss is not None and loss < 50 else None)
    eval_loss = ev.get("eval_loss")
    metrics = {"held_out_perplexity_before": ppl(before), "held_out_perplexity": ppl(eval_loss), "model": str(merged),
               "blocks": len(rows), "block_tokens": size}
    return RunSummary("pretrain", run_dir, adapter, out.global_step, out.training_loss, eval_loss, ppl(eval_loss),
                      tokens / train_time if tokens and train_time else None, seconds, 0, len(rows), metrics,
                      out.metrics.get("train_runtime"))

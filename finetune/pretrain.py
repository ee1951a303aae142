"""Pre-training on the user's own text: `crofter tune pretrain --base HF --text PATH...`, or from
scratch with `--from-config gpt2|llama|FILE.json --tokenizer DIR`.

The documents (plain-text files here; the CLI reads pdf, html, docx and code through rag's
loaders and passes their text in) are deduplicated by content, tokenized, each ended with the
tokenizer's end-of-text token, concatenated and cut into blocks of `max_length` tokens; a
fraction of the blocks (`eval_split`, taken whole from the end of the stream so no held-out text
leaks into training through a shared block) measures held-out perplexity before and after.
Continued pre-training is LoRA on every linear layer through transformers' Trainer with the loss
on every token, merged at the end into a full checkpoint at RUN/model; `full=True` (and every run
from scratch) trains every weight and saves the model itself there. RUN/model is the new base
for `tune sft` (and what a journey's next stage starts from).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Iterable

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


def read_documents(paths: Iterable[Path]) -> list[tuple[str, str]]:
    """(name, text) of every plain-text file the paths mean; errors name the file."""
    docs = []
    for path in paths:
        for f in text_files(path):
            try:
                docs.append((str(f), f.read_text(encoding="utf-8")))
            except UnicodeDecodeError as exc:
                raise DataError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return docs


def dedupe(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The documents with the same text (whitespace aside) kept once, and the names dropped:
    a note saved in two folders is not trained on twice, nor split across train and held-out."""
    seen, kept, dropped = set(), [], []
    for name, text in docs:
        key = hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()
        if key in seen:
            dropped.append(name)
            continue
        seen.add(key)
        kept.append((name, text))
    return kept, dropped


def blocks(tokenizer, docs: list, size: int) -> list[list[int]]:
    """Every document (a path, or (name, text)) tokenized and ended with EOS, concatenated, cut
    into `size`-token blocks (the tail shorter than a block is dropped unless it is all there is)."""
    if tokenizer.eos_token_id is None:
        raise TrainError("the tokenizer has no end-of-text token to separate documents with")
    docs = [d if isinstance(d, tuple) else read_documents([d])[0] for d in docs]
    stream: list[int] = []
    for _, text in docs:
        if text.strip():
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not stream:
        raise DataError(f"{docs[0][0] if docs else 'the text'}: the text is empty")
    out = [stream[i:i + size] for i in range(0, len(stream), size)]
    if len(out) > 1 and len(out[-1]) < size:
        out.pop()
    return out


# Model shapes to start from: GPT-2 124M, and SmolLM2-135M's Llama. --size changes any key.
PRESETS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024,
             "activation_function": "gelu_new", "tie_word_embeddings": True},
    "llama": {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 2048, "rope_theta": 10000.0,
              "tie_word_embeddings": True},
}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def scratch_model(spec: str, sizes: dict[str, str], tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised model of `spec` (a preset name or a config.json) with `sizes`
    applied, its vocabulary the tokenizer's, saved with the tokenizer at `out` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.atomic import atomic_dir

    if spec in PRESETS:
        values = dict(PRESETS[spec])
    else:
        path = Path(spec).expanduser()
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"--from-config {spec}: not a preset ({', '.join(PRESETS)}) nor a config.json file") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise DataError(f"{path}: a model config needs a \"model_type\" (gpt2, llama, qwen2, ...)")
    values.update({k: _value(v) for k, v in sizes.items()})
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"--tokenizer {tokenizer_dir}: not a tokenizer folder ({str(exc).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise DataError(f"--tokenizer {tokenizer_dir}: the tokenizer has no end-of-text token to separate documents with")
    values.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    model_type = values.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise DataError(f"--from-config {spec}: {exc}") from None
    plain = AutoConfig.for_model(model_type)  # a misspelt key would otherwise ride along unused
    known = set(plain.to_dict()) | set(getattr(plain, "attribute_map", {}))
    # transformers 5 keeps rope_theta and its kin inside rope_parameters; for_model still takes them
    known |= set(plain.to_dict().get("rope_parameters") or {})
    unknown = sorted(k for k in sizes if k not in known)
    if unknown:
        raise DataError(f"--size {unknown[0]}: not a setting of a {model_type} model")
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise DataError(f"--from-config {spec}: {str(exc).splitlines()[0]}") from None
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return out


def _tokens_at(ckpt: Path | None) -> float:
    """Input tokens the run had seen when `ckpt` was saved (0 for a fresh run)."""
    if ckpt is None:
        return 0.0
    try:
        return float(json.loads((ckpt / "trainer_state.json").read_text()).get("num_input_tokens_seen") or 0)
    except (OSError, ValueError):
        return 0.0


def pretrain(base: Path, text, run_dir: Path, recipe: Recipe, *, max_steps: int | None = None,
             epochs: float | None = None, resume: bool = False, full: bool = False,
             on_log: Callable[[dict], None] | None = None) -> RunSummary:
    """Pre-training on `text` (a path, a list of paths, or (name, text) documents); metrics hold
    the held-out perplexity before and after, and RUN/model. `full`: every weight, no LoRA."""
    if isinstance(text, (str, Path)):
        text = [text]
    docs = [d for d in text if isinstance(d, tuple)] + read_documents(Path(d) for d in text if not isinstance(d, tuple))
    docs, duplicates = dedupe(docs)
    _quiet()
    ckpt = _prepare_run(run_dir, resume)
    if (run_dir / "model").exists():
        raise TrainError(f"{run_dir / 'model'} exists: this run finished already; choose another --out")
    dev = device_info()
    # Every weight trained: float32 master weights (bf16 on a GPU is the Trainer's autocast), or
    # AdamW's small updates vanish in bf16's 8-bit mantissa.
    model, tok = load_base(base, recipe, {**dev, "bf16": False, "fp16": False} if full else dev)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    size = min(recipe.max_length, positions or recipe.max_length)
    # Labels are the ids themselves: every token counts, the end-of-text tokens between documents
    # too (a collator that masks the pad id would drop them, pad being EOS here).
    rows = [{"input_ids": b, "labels": list(b)} for b in blocks(tok, docs, size)]
    n_eval = max(1, int(len(rows) * recipe.eval_split)) if recipe.eval_split > 0 and len(rows) > 1 else 0
    train_rows, eval_rows = (rows[:-n_eval], rows[-n_eval:]) if n_eval else (rows, [])
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    # The plain Trainer: blocks need no chat handling, and TRL's SFTTrainer would also compute
    # the entropy and token accuracy of every logit row each step (25% of a CPU step here).
    args = _training_args(TrainingArguments, recipe, run_dir, dev, bool(eval_rows), max_steps, epochs,
                          include_num_input_tokens_seen=True, prediction_loss_only=True)
    _write_config(run_dir, kind="pretrain", base=str(base), text=[name for name, _ in docs], duplicates=duplicates,
                  full=full, recipe=recipe.as_dict(), device=dev, blocks=len(rows), block_tokens=size,
                  held_out_blocks=len(eval_rows), max_steps=args.max_steps)
    curve = CurveLogger(run_dir, on_log)
    if not full:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe, model.config.model_type))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from .linear_ce import fused_trainer, usable

    # The loss without batch-wide logits where the head and the launch allow it (finetune/linear_ce.py).
    trainer_cls = fused_trainer(Trainer) if usable(model, args) else Trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tok,
                      data_collator=default_data_collator, callbacks=[curve.callback])
    before = trainer.evaluate().get("eval_loss") if eval_rows and ckpt is None else None
    out, seconds, adapter, ev = _fit(trainer, curve, run_dir, ckpt, bool(eval_rows))
    del trainer, model
    if full:  # what _fit saved is the whole model: it is RUN/model as it stands
        adapter.rename(run_dir / "model")
        adapter = merged = run_dir / "model"
    else:
        merged = merge(base, adapter, run_dir / "model")
    train_time = out.metrics.get("train_runtime") or seconds
    seen = curve.last.get("num_input_tokens_seen")
    tokens = float(seen or curve.last.get("num_tokens") or 0)
    if seen:  # train_runtime is this process's; on --resume the count also holds the tokens trained before
        tokens = max(0.0, tokens - _tokens_at(ckpt))
    ppl = (lambda loss: math.exp(loss) if loss is not None and loss < 50 else None)
    eval_loss = ev.get("eval_loss")
    metrics = {"held_out_perplexity_before": ppl(before), "held_out_perplexity": ppl(eval_loss), "model": str(merged),
               "blocks": len(rows), "block_tokens": size, "documents": len(docs), "duplicates": len(duplicates),
               "full": full}
    return RunSummary("pretrain", run_dir, adapter, out.global_step, out.training_loss, eval_loss, ppl(eval_loss),
                      tokens / train_time if tokens and train_time else None, seconds, 0, len(rows), metrics,
                      out.metrics.get("train_runtime"))

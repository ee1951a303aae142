"""Where GRPO's reward comes from (`crofter tune grpo --reward SPEC`).

    SPEC = RUN                      a run folder written by `crofter tune reward` (its base + adapter
                                    + score head become one sequence-classification model)
    SPEC = python:MODULE:FUNC       a Python function; MODULE is an importable module (the current
                                    folder is searched first) or a path to a .py file

A Python reward is called as ``FUNC(prompts, completions, **kwargs)`` with the prompts as the text of
their last user message and the completions as the reply text, and returns one number per
completion (None for "no opinion"). For example, a format checker::

    def one_line(prompts, completions, **kwargs):
        return [1.0 if c.strip() and "\\n" not in c.strip() else 0.0 for c in completions]
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Callable


class RewardSpecError(ValueError):
    """The --reward given cannot be used; the message says which part and why."""


class RewardFunctionError(RuntimeError):
    """The user's reward function failed or returned something that is not a reward, mid-training."""


def _text(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content") or "")
    return str(item)


def python_reward(spec: str) -> Callable:
    """The function named by python:MODULE:FUNC, wrapped to take and check plain text."""
    body = spec[len("python:"):]
    module_name, sep, func_name = body.rpartition(":")
    if not sep or not module_name or not func_name:
        raise RewardSpecError(f"--reward {spec}: expected python:MODULE:FUNC (e.g. python:my_rewards:one_line)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise RewardSpecError(f"--reward {spec}: {path}: no such file")
            mod_spec = importlib.util.spec_from_file_location(f"crofter_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(str(Path.cwd()))
    except RewardSpecError:
        raise
    except ImportError as exc:
        raise RewardSpecError(f"--reward {spec}: cannot import {module_name} ({exc})") from None
    except Exception as exc:  # the module's own code failed while importing
        raise RewardSpecError(f"--reward {spec}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise RewardSpecError(f"--reward {spec}: {module_name} has no function {func_name!r}")

    def reward(prompts, completions, **kwargs):
        try:
            out = func([_text(p) for p in prompts], [_text(c) for c in completions], **kwargs)
        except Exception as exc:
            raise RewardFunctionError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
        try:
            values = list(out)
        except TypeError:
            raise RewardFunctionError(f"{spec} returned {type(out).__name__}; a reward function returns a list of "
                                      "numbers") from None
        if len(values) != len(completions):
            raise RewardFunctionError(f"{spec} returned {len(values)} rewards for {len(completions)} completions")
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v))):
                raise RewardFunctionError(f"{spec} returned {v!r} for completion {i + 1}; rewards are numbers (or None)")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = func_name  # TRL names the logged reward column after the function
    return reward


def reward_run(path: Path) -> tuple[Path, Path]:
    """(base, adapter) of a reward run folder, checked."""
    path = Path(path).expanduser()
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise RewardSpecError(f"--reward {path}: not a reward run (no config.json); train one with "
                              "`crofter tune reward`, or give python:MODULE:FUNC") from None
    except ValueError:
        raise RewardSpecError(f"--reward {path}/config.json: not valid JSON") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != "reward":
        raise RewardSpecError(f"--reward {path}: a {cfg.get('kind') if isinstance(cfg, dict) else '?'} run, "
                              "not a reward model (train one with `crofter tune reward`)")
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RewardSpecError(f"--reward {path}: the reward run has not finished (no adapter/ yet)")
    base = Path(cfg.get("base", ""))
    if not (base / "config.json").is_file():
        raise RewardSpecError(f"--reward {path}: its base {base} is gone (config.json records it)")
    return base, adapter


def load_reward_model(path: Path):
    """(model, tokenizer): the reward run's base with its adapter and score head merged in, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, adapter = reward_run(path)
    tok = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32,
                                                               local_files_only=True)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


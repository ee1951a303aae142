"""RLHF's second and third stages: a reward model, then GRPO against it (or against a Python reward).

    reward   TRL's RewardTrainer: the base with LoRA and a one-output score head, trained with the
             Bradley-Terry loss on prompt/chosen/rejected pairs; held-out pair accuracy and margin
             are logged (optional reward centering: recipe key center_rewards).
    grpo     TRL's GRPOTrainer: for each prompt, `num_generations` completions are sampled and
             scored, and the policy (LoRA on the base, or continuing an SFT/DPO adapter) moves
             towards the better ones of each group; the KL to the starting model (coefficient
             `beta`) is logged next to the mean reward. With a starting adapter the reference is a
             frozen copy of it (TRL's "ref" adapter); without one, the base with the adapter off.

PPO is not here: TRL 1.x has no PPOTrainer. GRPO needs no value model and is what TRL maintains.
Run folders have the same layout as sft/dpo (config.json, checkpoints/, adapter/, loss.csv/png).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .curve import CurveLogger
from .data import load_preferences, load_prompts
from .recipe import Recipe
from .reward_source import RewardFunctionError, RewardSpecError, load_reward_model, python_reward, reward_run
from .train import (
    RunSummary,
    TrainError,
    _fit,
    _prepare_run,
    _quiet,
    _split,
    _training_args,
    _write_config,
    device_info,
    load_base,
    lora_config,
    policy_adapter,
    policy_model,
)

REWARD_METRICS = ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def reward(base: Path, data: Path, run_dir: Path, recipe: Recipe, *, max_steps: int | None = None,
           epochs: float | None = None, resume: bool = False,
           on_log: Callable[[dict], None] | None = None) -> RunSummary:
    """Train a reward model; metrics hold the held-out (eval_) accuracy and margin when there is a split."""
    _quiet()
    pairs = load_preferences(data)
    ckpt = _prepare_run(run_dir, resume)
    dev = device_info()
    model, tok = load_base(base, recipe, dev, head="score")
    train_rows, eval_rows = _split(pairs, recipe.eval_split, recipe.seed)
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = _training_args(RewardConfig, recipe, run_dir, dev, bool(eval_rows), max_steps, epochs,
                          max_length=recipe.max_length, center_rewards_coefficient=recipe.center_rewards or None)
    _write_config(run_dir, kind="reward", base=str(base), data=str(data), recipe=recipe.as_dict(), device=dev,
                  pairs=len(pairs), held_out=len(eval_rows), max_steps=args.max_steps)
    curve = CurveLogger(run_dir, on_log)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tok,
                            peft_config=lora_config(recipe, model.config.model_type, task="SEQ_CLS"),
                            callbacks=[curve.callback])
    dropped = len(train_rows) - len(trainer.train_dataset)  # TRL drops pairs longer than max_length
    out, seconds, saved, ev = _fit(trainer, curve, run_dir, ckpt, bool(eval_rows))
    metrics = {k: v for k, v in {**curve.last, **ev}.items() if k.removeprefix("eval_") in REWARD_METRICS}
    metrics["held_out_pairs"] = len(eval_rows)
    return RunSummary("reward", run_dir, saved, trainer.state.global_step, out.training_loss, ev.get("eval_loss"),
                      None, None, seconds, dropped, len(pairs), metrics, out.metrics.get("train_runtime"))


def grpo(base: Path, prompts: Path, run_dir: Path, recipe: Recipe, *, reward: str, adapter: Path | None = None,
         max_steps: int | None = None, epochs: float | None = None, resume: bool = False,
         on_log: Callable[[dict], None] | None = None) -> RunSummary:
    """GRPO; metrics hold the mean reward of the first and last logged steps, its mean, and the last KL."""
    adapter = policy_adapter(adapter) if adapter is not None else None  # before anything heavy
    if recipe.batch_size % recipe.num_generations:
        raise TrainError(f"batch_size {recipe.batch_size} is not a multiple of num_generations {recipe.num_generations}: "
                         "each step scores whole groups of completions of one prompt (raise --batch-size)")
    try:  # a Python reward is imported now; a reward run is checked now and loaded after the policy
        func = python_reward(reward) if reward.startswith("python:") else None
        if func is None:
            reward_run(Path(reward))
    except RewardSpecError as exc:
        raise TrainError(str(exc)) from None
    _quiet()
    rows = [{"prompt": p} for p in load_prompts(prompts)]
    ckpt = _prepare_run(run_dir, resume)
    dev = device_info()
    model, tok, peft_config = policy_model(base, recipe, dev, adapter)
    func, func_tok = (func, None) if func is not None else load_reward_model(Path(reward))
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = _training_args(GRPOConfig, recipe, run_dir, dev, False, max_steps, epochs, beta=recipe.beta,
                          num_generations=recipe.num_generations, max_completion_length=recipe.max_completion_length,
                          temperature=recipe.temperature, top_p=recipe.top_p, log_completions=False)
    _write_config(run_dir, kind="grpo", base=str(base), adapter=str(adapter) if adapter else None,
                  prompts=str(prompts), reward=reward, recipe=recipe.as_dict(), device=dev, examples=len(rows),
                  max_steps=args.max_steps)
    curve = CurveLogger(run_dir, on_log)
    rewards: list[float] = []

    def keep(logs: dict) -> None:
        if logs.get("reward") is not None:
            rewards.append(float(logs["reward"]))
        if on_log:
            on_log(logs)

    curve.on_log = keep
    trainer = GRPOTrainer(model=model, reward_funcs=func, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, reward_processing_classes=func_tok, peft_config=peft_config,
                          callbacks=[curve.callback])
    try:  # the adapter saved is the policy alone, not TRL's frozen "ref" copy
        out, seconds, saved, _ = _fit(trainer, curve, run_dir, ckpt, False, selected_adapters=["default"])
    except RewardFunctionError as exc:
        done = trainer.state.global_step
        raise TrainError(f"{exc} (at step {done + 1}); {run_dir} keeps its complete checkpoints: fix the function "
                         "and continue with --resume") from None
    metrics = {"reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
               "reward_mean": sum(rewards) / len(rewards) if rewards else None, "kl": curve.last.get("kl"),
               "reward_std": curve.last.get("reward_std")}
    return RunSummary("grpo", run_dir, saved, trainer.state.global_step, out.training_loss, None, None, None,
                      seconds, 0, len(rows), metrics, out.metrics.get("train_runtime"))

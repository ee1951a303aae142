"""Training recipes: typed settings with defaults, loaded from YAML (finetune/configs/*.yaml or a file).

    >>> load_recipe("lora").lora_r                      # doctest: +SKIP
    16

Unknown keys and bad values are refused with the file and key named, so a typo never
silently trains with a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
              "apo_down", "discopop", "aot", "aot_unpaired", "sft")


class RecipeError(ValueError):
    pass


@dataclass
class Recipe:
    # LoRA (peft). "all-linear" = every linear layer of the architecture except the output head.
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    use_rslora: bool = False
    target_modules: list | str = "all-linear"
    qlora: bool = False  # base in 4-bit NF4 through bitsandbytes (CUDA)
    # Optimisation.
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_length: int = 1024
    packing: bool = False
    gradient_checkpointing: bool = True
    eval_split: float = 0.1  # fraction held out for eval loss and perplexity (0: none)
    save_steps: int = 50
    logging_steps: int = 1
    seed: int = 42
    # DPO.
    beta: float = 0.1
    loss_type: str = "sigmoid"
    sft_weight: float = 0.0  # an SFT term on the chosen answers (TRL's rpo_alpha); 0: none
    # Reward model (tune reward): pulls the mean reward towards 0 (TRL's center_rewards_coefficient; 0: off).
    center_rewards: float = 0.0
    # GRPO (tune grpo; beta above is its KL coefficient): completions sampled per prompt, and how.
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    extra: dict = field(default_factory=dict)  # passed to the TRL config as is (advanced)

    def __post_init__(self) -> None:
        checks = [
            ("lora_r", self.lora_r >= 1), ("lora_alpha", self.lora_alpha > 0), ("lora_dropout", 0 <= self.lora_dropout < 1),
            ("learning_rate", 0 < self.learning_rate < 1), ("epochs", self.epochs > 0), ("batch_size", self.batch_size >= 1),
            ("grad_accum", self.grad_accum >= 1), ("max_length", self.max_length >= 16), ("eval_split", 0 <= self.eval_split < 1),
            ("save_steps", self.save_steps >= 1), ("beta", self.beta > 0), ("loss_type", self.loss_type in LOSS_TYPES),
            ("sft_weight", self.sft_weight >= 0), ("warmup_ratio", 0 <= self.warmup_ratio < 1),
            ("center_rewards", self.center_rewards >= 0), ("num_generations", self.num_generations >= 2),
            ("max_completion_length", self.max_completion_length >= 1), ("temperature", self.temperature > 0),
            ("top_p", 0 < self.top_p <= 1),
        ]
        for key, ok in checks:
            if not ok:
                raise RecipeError(f"{key}: {getattr(self, key)!r} is out of range"
                                  + (f" (one of {', '.join(LOSS_TYPES)})" if key == "loss_type" else ""))

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def load_recipe(name_or_path: str | None) -> Recipe:
    """A recipe by name (finetune/configs/NAME.yaml) or path; None gives the defaults."""
    if not name_or_path:
        return Recipe()
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS / f"{name_or_path}.yaml"
        if not path.is_file():
            raise RecipeError(f"no recipe named {name_or_path!r} (have: {', '.join(recipe_names())})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of settings")
    raw.pop("description", None)
    known = {f.name: f for f in dataclasses.fields(Recipe)}
    for key, value in raw.items():
        if key not in known:
            raise RecipeError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        want = known[key].type
        if want in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecipeError(f"{path}: {key}: expected a number, got {value!r}")
        if want == "bool" and not isinstance(value, bool):
            raise RecipeError(f"{path}: {key}: expected true or false, got {value!r}")
        if want == "int" and isinstance(value, float) and not value.is_integer():
            raise RecipeError(f"{path}: {key}: expected an integer, got {value!r}")
    try:
        return Recipe(**{k: (int(v) if known[k].type == "int" else v) for k, v in raw.items()})
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None

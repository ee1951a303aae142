"""Reading a journey file: every key checked, every input found, before anything runs.

    base: smollm2-135m-hf          # an HF folder or store name (or an `import` stage)
    name: persona-smol             # registered under this name at the end (default: the file's stem)
    eval: {text: held_out.txt, prompts: suite.yaml}
    stages:
      sft: {data: persona.jsonl, max_steps: 30}
      dpo: {data: chats}
      merge: {}
      convert: {}
      quantize: {type: Q4_K_M}

Stages run in the fixed order of STAGE_ORDER whatever order the file lists them in. Relative
paths are read from the journey file's folder; paths given with --set from the current folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STAGE_ORDER = ("import", "pretrain", "sft", "dpo", "reward", "grpo", "merge", "convert", "quantize")
TUNE_KEYS = {"recipe": "recipe", "max_steps": int, "epochs": float, "lr": float, "batch_size": int,
             "max_length": int, "eval_split": float}
# GRPO samples its own completions: no held-out split or example length, but group size and completion length.
GRPO_KEYS = {**{k: v for k, v in TUNE_KEYS.items() if k not in ("max_length", "eval_split")},
             "num_generations": int, "max_completion_length": int}
STAGE_KEYS: dict[str, dict] = {
    "import": {"checkpoint": "path", "tokenizer": "path"},
    "pretrain": {"text": "path", **TUNE_KEYS},
    "sft": {"data": "path", **TUNE_KEYS},
    "dpo": {"data": "data", "chats": list, "with_compare": bool, **TUNE_KEYS},
    "reward": {"data": "data", "chats": list, "with_compare": bool, **TUNE_KEYS},
    "grpo": {"prompts": "path", "reward": str, **GRPO_KEYS},
    "merge": {},
    "convert": {"outtype": str},
    "quantize": {"type": str, "calibration": "path"},
}
EVAL_KEYS = {"text": "path", "prompts": "path", "tasks": str, "include_path": "path", "limit": int,
             "ctx": int, "max_windows": int, "retrieval": "path", "collection": str, "k": int}
TOP_KEYS = ("description", "base", "name", "eval", "stages")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
QTYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0")
ADAPTER_STAGES = ("sft", "dpo", "grpo")


class JourneyError(ValueError):
    """A journey file that cannot run: the message names the file, the stage and the key."""


@dataclass
class Stage:
    kind: str
    cfg: dict
    index: int = 0          # 1-based position in the run

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-{self.kind}"


@dataclass
class Journey:
    path: Path
    name: str
    base: str | None                  # a store name or an HF folder; None when an import stage makes it
    stages: list[Stage]
    eval: dict = field(default_factory=dict)
    description: str = ""
    base_path: Path | None = None     # the base's folder, resolved (None with an import stage)
    warnings: list[str] = field(default_factory=list)  # what runs but measures less than it seems

    def stage(self, kind: str) -> Stage | None:
        return next((s for s in self.stages if s.kind == kind), None)


def _parse_set(item: str) -> tuple[list[str], object]:
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise JourneyError(f"--set {item!r}: expected KEY=VALUE (e.g. base=HF_DIR or sft.max_steps=10)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _apply_sets(raw: dict, sets: list[str]) -> set[tuple[str, ...]]:
    """Apply --set overrides; returns the keys they set (their paths are read from the current folder)."""
    done = set()
    for item in sets:
        keys, value = _parse_set(item)
        if keys[0] in STAGE_ORDER:       # sft.max_steps is short for stages.sft.max_steps
            keys = ["stages", *keys]
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise JourneyError(f"--set {item}: {k} is not a mapping")
            node = nxt
        node[keys[-1]] = value
        done.add(tuple(keys))
    return done


def _typed(where: str, key: str, want, value, here: Path, cwd_keys: set, key_path: tuple) -> object:
    if want == "recipe":  # a recipe name (finetune/configs) or a YAML file next to the journey
        if not isinstance(value, str) or not value:
            raise JourneyError(f"{where}: {key}: expected a recipe name or file, got {value!r}")
        if not value.endswith((".yaml", ".yml")) and "/" not in value:
            return value
        want = "path"
    if want in ("path", "data"):
        if want == "data" and value == "chats":
            return "chats"
        if not isinstance(value, str) or not value:
            raise JourneyError(f"{where}: {key}: expected a path, got {value!r}")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = (Path.cwd() if key_path in cwd_keys else here) / p
        p = p.resolve()
        if not p.exists():
            raise JourneyError(f"{where}: {key}: {p} does not exist")
        return p
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise JourneyError(f"{where}: {key}: expected a list of chat ids, got {value!r}")
        return value
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise JourneyError(f"{where}: {key}: expected {want.__name__}, got {value!r}")
    return value


def _mapping(where: str, raw, known: dict, here: Path, cwd_keys: set, prefix: tuple) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise JourneyError(f"{where}: expected a mapping of settings, got {raw!r}")
    out = {}
    for key, value in raw.items():
        if key not in known:
            hint = f" (known: {', '.join(sorted(known))})" if known else " (this stage takes no settings)"
            raise JourneyError(f"{where}: unknown key {key!r}{hint}")
        out[key] = _typed(where, key, known[key], value, here, cwd_keys, (*prefix, key))
    return out


def load_journey(path: str | Path, sets: list[str] | None = None) -> Journey:
    """The journey in `path` with `sets` (KEY=VALUE) applied, checked whole."""
    import yaml

    path = Path(path).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JourneyError(f"{path}: no such journey file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JourneyError(f"{path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise JourneyError(f"{path}{at}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(raw, dict):
        raise JourneyError(f"{path}: a journey is a mapping with `stages` (and `base`, `eval`, `name`)")
    cwd_keys = _apply_sets(raw, sets or [])
    for key in raw:
        if key not in TOP_KEYS:
            raise JourneyError(f"{path}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    here = path.parent.resolve()
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise JourneyError(f"{path}: `stages` must map stage names to their settings "
                           f"(stages: {', '.join(STAGE_ORDER)})")
    for kind in stages_raw:
        if kind not in STAGE_ORDER:
            raise JourneyError(f"{path}: stages: unknown stage {kind!r} (known: {', '.join(STAGE_ORDER)})")
    stages = []
    for kind in (k for k in STAGE_ORDER if k in stages_raw):
        cfg = _mapping(f"{path}: stage {kind}", stages_raw[kind], STAGE_KEYS[kind], here, cwd_keys, ("stages", kind))
        stages.append(Stage(kind, cfg, len(stages) + 1))
    ev = _mapping(f"{path}: eval", raw.get("eval"), EVAL_KEYS, here, cwd_keys, ("eval",))
    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise JourneyError(f"{path}: name: expected text, got {name!r}")
    j = Journey(path, name, raw.get("base"), stages, ev, str(raw.get("description") or ""))
    _check(j, cwd_keys)
    return j


def _check(j: Journey, cwd_keys: set) -> None:
    """The rules between stages, and the base."""
    where = str(j.path)
    kinds = [s.kind for s in j.stages]
    if "import" in kinds:
        if j.base:
            raise JourneyError(f"{where}: base: the import stage makes the base; remove one of them")
        imp = j.stage("import").cfg
        for key in ("checkpoint", "tokenizer"):
            if key not in imp:
                raise JourneyError(f"{where}: stage import: missing key {key!r}")
    elif not j.base:
        raise JourneyError(f"{where}: missing key 'base' (an HF folder or store name), or add an import stage")
    else:
        j.base_path = _resolve_base(where, j.base, ("base",) in cwd_keys, j.path.parent)
    for kind, key in (("pretrain", "text"), ("sft", "data"), ("dpo", "data"), ("reward", "data"), ("grpo", "prompts")):
        s = j.stage(kind)
        if s is not None and key not in s.cfg:
            raise JourneyError(f"{where}: stage {kind}: missing key {key!r}")
    grpo = j.stage("grpo")
    if grpo is not None:
        reward = grpo.cfg.setdefault("reward", "reward" if "reward" in kinds else "")
        if not reward:
            raise JourneyError(f"{where}: stage grpo: missing key 'reward' (a reward stage, or python:MODULE:FUNC)")
        if reward == "reward" and "reward" not in kinds:
            raise JourneyError(f"{where}: stage grpo: reward: 'reward' names a reward stage and there is none")
        if reward != "reward" and not reward.startswith("python:"):
            raise JourneyError(f"{where}: stage grpo: reward: expected 'reward' or python:MODULE:FUNC, got {reward!r}")
    if "reward" in kinds and "grpo" not in kinds:
        raise JourneyError(f"{where}: stage reward: a reward model is for a grpo stage; add one or drop the stage")
    if "dpo" in kinds and "grpo" in kinds:
        raise JourneyError(f"{where}: stages dpo and grpo: choose one way to align (dpo, or reward + grpo)")
    adapters = [k for k in kinds if k in ADAPTER_STAGES]
    if "merge" in kinds and not adapters:
        raise JourneyError(f"{where}: stage merge: nothing to merge (no sft, dpo or grpo stage before it)")
    if adapters and "merge" not in kinds and ("convert" in kinds or "quantize" in kinds):
        raise JourneyError(f"{where}: stage convert: the {adapters[-1]} adapter must be merged first: add `merge: {{}}`")
    if "quantize" in kinds and "convert" not in kinds:
        raise JourneyError(f"{where}: stage quantize: quantizing needs a convert stage before it (the F16 GGUF)")
    conv = j.stage("convert")
    if conv is not None and conv.cfg.setdefault("outtype", "f16") not in OUTTYPES:
        raise JourneyError(f"{where}: stage convert: outtype: one of {', '.join(OUTTYPES)}, got {conv.cfg['outtype']!r}")
    q = j.stage("quantize")
    if q is not None and q.cfg.setdefault("type", "Q4_K_M") not in QTYPES:
        raise JourneyError(f"{where}: stage quantize: type: one of {', '.join(QTYPES)}, got {q.cfg['type']!r}")
    if j.eval.get("retrieval") and not j.eval.get("collection"):
        raise JourneyError(f"{where}: eval: retrieval: name the collection it searches (collection: NAME)")
    for key, low in (("ctx", 32), ("max_windows", 1), ("limit", 1), ("k", 1)):
        if key in j.eval and j.eval[key] < low:
            raise JourneyError(f"{where}: eval: {key}: at least {low}, got {j.eval[key]}")
    for s in j.stages:
        for key in ("max_steps", "batch_size", "max_length"):
            if key in s.cfg and s.cfg[key] < 1:
                raise JourneyError(f"{where}: stage {s.kind}: {key}: at least 1, got {s.cfg[key]}")
    held_out = j.eval.get("text")
    for kind, key, why in (("quantize", "calibration", "its perplexity and KLD will flatter the quant"),
                           ("pretrain", "text", "its held-out perplexity is not held out")):
        s = j.stage(kind)
        if held_out and s is not None and s.cfg.get(key) and _same_text(s.cfg[key], held_out):
            j.warnings.append(f"{where}: stage {kind}: {key}: {s.cfg[key]} is the eval text ({held_out}); {why}")


def _same_text(a: Path, b: Path) -> bool:
    """Whether a and b are one text: the same path, a folder holding the other, or files of equal bytes."""
    a, b = Path(a).resolve(), Path(b).resolve()
    if a == b or a in b.parents or b in a.parents:
        return True
    import filecmp

    try:
        return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _resolve_base(where: str, base, from_cwd: bool, here: Path) -> Path:
    from models.registry import ModelError, Registry

    if not isinstance(base, str):
        raise JourneyError(f"{where}: base: expected a folder or store name, got {base!r}")
    p = Path(base).expanduser()
    if not p.is_absolute() and ("/" in base or base.startswith(".")):
        p = (Path.cwd() if from_cwd else here) / p
    try:
        return Registry().resolve_kind(str(p) if p.exists() else base, "hf",
                                       "a journey trains an HF checkpoint folder (safetensors)")
    except ModelError as exc:
        raise JourneyError(f"{where}: base: {exc}") from None

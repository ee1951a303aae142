"""What `crofter journey diff A B` compares: each side's model folder (and adapter), and the prompts.

A side is written as one of::

    HF_DIR                 an HF checkpoint folder (config.json + *.safetensors), e.g. RUN/03-merge/model
    RUN/03-merge           a journey stage folder holding model/ (the import or merge stage)
    BASE+ADAPTER_DIR       an HF base with a peft LoRA adapter (or a `crofter tune` run folder) on top
    RUN/01-sft             a `crofter tune sft|dpo|grpo` run folder: RUN/adapter on the base its config.json names
    ADAPTER_DIR            a peft adapter folder whose recorded base_model_name_or_path is a local folder

Only files are read here (JSON, folder listings): no torch, so a wrong path is refused at once,
with one line naming the file at fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.adapters import ADAPTER_CONFIG, AdapterError, is_run_folder, resolve_adapter

NOT_CAUSAL = ("reward",)  # run kinds whose adapter sits on a scoring head, not a language model


class DiffError(Exception):
    """A diff cannot be made; the message names the file (and line or key) at fault."""


@dataclass(frozen=True)
class Side:
    """One model of a diff: the HF folder whose weights load, a LoRA adapter on top or None, and
    the folder the tokenizer is read from (the adapter's when it saved one, as `tune merge` does)."""
    spec: str
    model: Path
    adapter: Path | None = None
    tokenizer: Path | None = None

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer or self.model

    def as_dict(self) -> dict:
        return {"spec": self.spec, "model": str(self.model), "adapter": str(self.adapter) if self.adapter else None}


def _hf_folder(path: Path, what: str = "model") -> Path:
    """`path` if it is an HF checkpoint folder with safetensors weights, else DiffError saying why."""
    if not path.exists():
        raise DiffError(f"{path}: no such folder ({what})")
    if not path.is_dir():
        raise DiffError(f"{path}: not a folder ({what})")
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffError(f"{path}: not an HF checkpoint folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise DiffError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise DiffError(f"{cfg_path}: not an HF model config (no model_type)")
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin"))
        raise DiffError(f"{path}: no *.safetensors weights"
                        + (" (only pickled .bin files, which crofter refuses)" if pickled else ""))
    return path


def _with_adapter(spec: str, base: Path, adapter_spec: Path) -> Side:
    _hf_folder(base, "the base model")
    try:
        adapter = resolve_adapter(adapter_spec, note=None)
    except AdapterError as exc:
        raise DiffError(str(exc)) from None
    _refuse_scorer(adapter_spec)
    tok = adapter if (adapter / "tokenizer_config.json").is_file() else None
    return Side(spec, base, adapter, tok)


def _refuse_scorer(run: Path) -> None:
    try:
        kind = json.loads((run / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return
    if kind in NOT_CAUSAL:
        raise DiffError(f"{run}: a {kind} model's run folder (a scoring head, not a language model); "
                        "diff the policy or its base instead")


def _run_folder(spec: str, run: Path) -> Side:
    cfg_path = run / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffError(f"{run}: a run folder without config.json: write BASE+{run} to name its base") from None
    except (OSError, ValueError) as exc:
        raise DiffError(f"{cfg_path}: not valid JSON ({exc})") from None
    base = cfg.get("base") if isinstance(cfg, dict) else None
    if not isinstance(base, str) or not base:
        raise DiffError(f"{cfg_path}: no `base` key naming the model the adapter applies to; write BASE+{run}")
    base_path = Path(base).expanduser()
    if not base_path.is_dir():
        raise DiffError(f"{cfg_path}: base: {base} is not a folder here; write BASE+{run}")
    return _with_adapter(spec, base_path, run)


def _adapter_alone(spec: str, folder: Path) -> Side:
    cfg_path = folder / ADAPTER_CONFIG
    try:
        recorded = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise DiffError(f"{cfg_path}: unreadable ({exc})") from None
    if not recorded or not Path(recorded).expanduser().is_dir():
        raise DiffError(f"{cfg_path}: base_model_name_or_path {recorded!r} is not a local folder; "
                        f"write BASE+{folder}")
    return _with_adapter(spec, Path(recorded).expanduser(), folder)


def resolve_side(spec: str) -> Side:
    """The Side a command-line argument means (see the module docstring), or DiffError naming the path.

    >>> resolve_side("runs/j/01-sft")            # doctest: +SKIP
    Side(spec='runs/j/01-sft', model=PosixPath('hf/smol'), adapter=PosixPath('runs/j/01-sft/adapter'), ...)
    """
    if not spec:
        raise DiffError("an empty model argument (expected HF_DIR, BASE+ADAPTER_DIR or a run stage folder)")
    path = Path(spec).expanduser()
    if not path.exists() and "+" in spec:
        # BASE+ADAPTER: the first split where both halves exist (a path may hold '+' itself)
        for i, ch in enumerate(spec):
            if ch == "+" and Path(spec[:i]).expanduser().exists() and Path(spec[i + 1:]).expanduser().exists():
                return _with_adapter(spec, Path(spec[:i]).expanduser(), Path(spec[i + 1:]).expanduser())
        base, _, adapter = spec.partition("+")
        missing = base if not Path(base).expanduser().exists() else adapter
        raise DiffError(f"{missing}: no such folder (in {spec}: BASE+ADAPTER_DIR)")
    if not path.exists():
        raise DiffError(f"{path}: no such folder (expected HF_DIR, BASE+ADAPTER_DIR or a run stage folder)")
    if not path.is_dir():
        raise DiffError(f"{path}: not a folder (expected HF_DIR, BASE+ADAPTER_DIR or a run stage folder)")
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter_alone(spec, path)
    if is_run_folder(path):
        _refuse_scorer(path)
        return _run_folder(spec, path)
    if not (path / "config.json").exists() and (path / "model" / "config.json").is_file():
        return Side(spec, _hf_folder(path / "model"))  # a journey's import or merge stage folder
    return Side(spec, _hf_folder(path))


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file (one a line; blank lines skipped) or a JSONL file ({"prompt": ...}
    a line: chosen by a .jsonl suffix or a first line starting with '{'). Errors read FILE:LINE: why."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DiffError(f"{path}: no such prompts file") from None
    except IsADirectoryError:
        raise DiffError(f"{path}: a folder, not a prompts file") from None
    except UnicodeDecodeError as exc:
        line = _line_of(path, exc.start)
        raise DiffError(f"{path}:{line}: not UTF-8 text") from None
    except OSError as exc:
        raise DiffError(f"{path}: unreadable ({exc.strerror or exc})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    jsonl = path.suffix.lower() == ".jsonl" or first.lstrip().startswith("{")
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DiffError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise DiffError(f"{path}:{n}: expected a JSON object with a \"prompt\" string")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            got = "missing" if prompt is None else f"got {type(prompt).__name__}" if not isinstance(prompt, str) else "empty"
            raise DiffError(f"{path}:{n}: \"prompt\" must be a non-empty string ({got})")
        prompts.append(prompt)
    if not prompts:
        raise DiffError(f"{path}: no prompts (one a line, or JSONL with {{\"prompt\": ...}})")
    return prompts


def _line_of(path: Path, offset: int) -> int:
    """The 1-based line holding byte `offset` of `path`."""
    with open(path, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1

"""Which LoRA adapter a path means: a peft adapter folder, or the run folder `crofter tune sft|dpo` wrote.

A run folder (see finetune/train.py) keeps its final adapter in ``RUN/adapter`` and its Trainer
checkpoints in ``RUN/checkpoints/checkpoint-N``; wherever crofter takes an adapter, the run
folder works too::

    >>> resolve_adapter("runs/persona")          # doctest: +SKIP
    crofter: using the adapter in runs/persona/adapter
    PosixPath('runs/persona/adapter')

Only files are looked at (adapter_config.json, the safetensors header, trainer_state.json):
no torch or peft, so the CLI can refuse a wrong path before loading anything heavy.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Callable

from .registry import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_KINDS = ("pretrain", "sft", "dpo", "reward", "grpo")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class AdapterError(ModelError):
    """The path given as an adapter is not one (or not a finished one); the message says which and why."""


def checkpoint_complete(folder: Path) -> bool:
    """True when a Trainer checkpoint was saved to the end.

    The Trainer writes the adapter, then optimizer/scheduler/RNG state, and trainer_state.json
    last, so a parsing state file plus present adapter and optimizer means nothing was cut short
    (a process killed while saving leaves the state file missing or cut)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = any((folder / name).is_file() for name in (ADAPTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json"))
    return weights and (folder / "optimizer.pt").is_file()  # an adapter, or a whole model (pretrain --full)


def checkpoint_step(folder: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    m = _CHECKPOINT_RE.match(folder.name)
    return int(m.group(1)) if m else None


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint-N with the highest N under `checkpoints`, or None."""
    if not checkpoints.is_dir():
        return None
    found = [(checkpoint_step(d), d) for d in checkpoints.iterdir() if checkpoint_step(d) is not None]
    done = [(step, d) for step, d in found if checkpoint_complete(d)]
    return max(done)[1] if done else None


def is_run_folder(path: Path) -> bool:
    """A folder `crofter tune sft|dpo|reward|grpo` wrote: it has adapter/ or checkpoints/, or its config.json names the kind."""
    if (path / "adapter").is_dir() or (path / "checkpoints").is_dir():
        return True
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("kind") in RUN_KINDS


def _safetensors_complete(path: Path) -> str | None:
    """None when the file's header parses and its tensors end exactly at the end of the file, else why not."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return "shorter than its header"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                return f"header length {n} runs past the end of the file"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return "the header is not a mapping"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2]
    if 8 + n + max(ends, default=0) != size:
        return f"{size} bytes where the header describes {8 + n + max(ends, default=0)} (cut short?)"
    return None


def check_adapter(folder: Path) -> Path:
    """`folder` if it holds a readable peft adapter, else AdapterError naming the file at fault."""
    cfg_path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{folder}: not a peft adapter folder (no {ADAPTER_CONFIG})") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}"
                           + (" (only pickled adapter_model.bin, which crofter refuses)" if pickled else
                              " (the adapter was not saved to the end)"))
    why = _safetensors_complete(weights)
    if why:
        raise AdapterError(f"{weights}: {why}")
    return folder


def _unfinished_checkpoint(folder: Path) -> None:
    """A checkpoint-N a kill cut short is refused, pointing at the last complete one."""
    if checkpoint_step(folder) is None or checkpoint_complete(folder):
        return
    last = last_complete_checkpoint(folder.parent)
    hint = f"; the last complete one is {last}" if last else "; there is no complete one"
    raise AdapterError(f"{folder}: this checkpoint was not saved to the end (the run stopped while saving it){hint}")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def resolve_adapter(path: str | Path, note: Callable[[str], None] | None = _stderr) -> Path:
    """The adapter folder `path` means: itself, or RUN/adapter for a run folder (saying so through `note`).

    A run folder without its adapter (a run stopped before the end) is refused, naming its last
    complete checkpoint when it has one: that checkpoint is itself an adapter folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterError(f"{path}: no such folder (expected a LoRA adapter folder or a `crofter tune` run folder)")
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder (expected a LoRA adapter folder or a `crofter tune` run folder)")
    if (path / ADAPTER_CONFIG).exists():
        _unfinished_checkpoint(path)
        return check_adapter(path)
    if not is_run_folder(path):
        raise AdapterError(f"{path}: not a peft adapter folder (no {ADAPTER_CONFIG}) "
                           "nor a `crofter tune` run folder (no adapter/)")
    final = path / "adapter"
    if final.is_dir():
        check_adapter(final)
        if note is not None:
            note(f"crofter: using the adapter in {final}")
        return final
    last = last_complete_checkpoint(path / "checkpoints")
    if last is not None:
        raise AdapterError(f"{path}: this run folder has no adapter/ (the run stopped before it finished); "
                           f"its last complete checkpoint is {last}: pass that as the adapter, or finish the run "
                           f"with --resume --out {path}")
    raise AdapterError(f"{path}: this run folder has no adapter/ and no complete checkpoint "
                       "(the run stopped before its first save); run the training again")

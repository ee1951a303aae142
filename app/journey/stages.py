"""Each stage as the crofter command that does it, and each stage's evaluation as `crofter eval`.

A stage works in its own folder RUN/NN-KIND. `Chain` carries what the stages so far have made
(the base, the newest adapter, the reward model, the merged folder, the GGUF files) to the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .plan import GRPO_KEYS, TUNE_KEYS, Journey, JourneyError, Stage

TUNE_RESUMABLE = ("pretrain", "sft", "dpo", "reward", "grpo")


@dataclass
class Chain:
    base: Path | None = None       # the HF folder adapters apply to
    adapter: Path | None = None    # the newest sft/dpo/grpo run folder
    reward: Path | None = None     # the reward stage's run folder
    merged: Path | None = None
    f16: Path | None = None        # the converted GGUF
    quant: Path | None = None
    base_gguf: Path | None = None  # the base as F16 GGUF, made only for prompt suites

    def final_model(self) -> Path | None:
        return self.quant or self.f16 or self.merged


@dataclass
class Step:
    argv: list[str]                       # crofter's arguments
    folder: Path
    outputs: dict[str, Path] = field(default_factory=dict)   # what must exist for the stage to count as done
    data: Path | None = None              # an exported chats file this step trains on


def _tune_flags(cfg: dict, keys=TUNE_KEYS) -> list[str]:
    out = []
    for key in keys:
        if key in cfg:
            out += [f"--{key.replace('_', '-')}", str(cfg[key])]
    return out


def chats_data(stage: Stage, run_dir: Path, write: bool = True) -> Path:
    """`data: chats`: the preference pairs of the user's chats, exported into the run folder
    (with write=False, only when the file is not there yet: a dry run writes nothing else)."""
    import json

    from models.atomic import write_text

    from .. import chat_export
    from ..history import HistoryStore

    store = HistoryStore()
    try:
        pairs = chat_export.training_pairs(store, stage.cfg.get("chats") or None, bool(stage.cfg.get("with_compare")))
    finally:
        store.close()
    if not pairs:
        which = "chats " + ", ".join(map(str, stage.cfg["chats"])) if stage.cfg.get("chats") else "any chat"
        raise JourneyError(f"stage {stage.kind}: data: chats: no preference pairs in {which} (mark a reply preferred "
                           "after a regenerate in the chat app, or give a JSONL file)")
    path = run_dir / "data" / f"{stage.folder_name}-prefs.jsonl"
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        if not write:
            import tempfile

            fd, tmp = tempfile.mkstemp(prefix="crofter-journey-", suffix=".jsonl")
            with open(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            return Path(tmp)
        write_text(path, text)
    return path


def data_of(stage: Stage, run_dir: Path, write: bool = True) -> Path | None:
    data = stage.cfg.get("data")
    return chats_data(stage, run_dir, write) if data == "chats" else data


def build(stage: Stage, run_dir: Path, chain: Chain, journey: Journey, write: bool = True) -> Step:
    """The command for `stage`, given what came before; `chain` is updated to what it will make."""
    f = run_dir / stage.folder_name
    c, k = stage.cfg, stage.kind
    if k == "import":
        chain.base = f / "model"
        return Step(["import", "nanogpt", str(c["checkpoint"]), "--tokenizer", str(c["tokenizer"]), "--out",
                     str(f / "model"), "--no-register", "--json"], f, {"model": f / "model"})
    if k == "pretrain":  # its output is a new base (the adapter merged in): what every later stage starts from
        argv = ["tune", "pretrain", "--base", str(chain.base), "--text", str(c["text"]), "--out", str(f), "--json",
                "--no-register", *_tune_flags(c)]
        chain.base = f / "model"
        return Step(argv, f, {"model": f / "model"})
    if k in ("sft", "dpo", "reward"):
        data = data_of(stage, run_dir, write)
        argv = ["tune", k, "--base", str(chain.base), "--data", str(data), "--out", str(f), "--json", *_tune_flags(c)]
        if k == "dpo" and chain.adapter is not None:
            argv += ["--adapter", str(chain.adapter)]
        if k == "reward":
            chain.reward = f
        else:
            chain.adapter = f
        return Step(argv, f, {"adapter": f / "adapter"}, data if c.get("data") == "chats" else None)
    if k == "grpo":
        reward = str(chain.reward) if c["reward"] == "reward" else c["reward"]
        argv = ["tune", "grpo", "--base", str(chain.base), "--prompts", str(c["prompts"]), "--reward", reward,
                "--out", str(f), "--json", *_tune_flags(c, GRPO_KEYS)]
        if chain.adapter is not None:
            argv += ["--adapter", str(chain.adapter)]
        chain.adapter = f
        return Step(argv, f, {"adapter": f / "adapter"})
    if k == "merge":
        argv = ["tune", "merge", "--base", str(chain.base), "--adapter", str(chain.adapter), "--out", str(f / "model"),
                "--no-register", "--json"]
        chain.merged = f / "model"
        return Step(argv, f, {"model": f / "model"})
    if k == "convert":
        src = chain.merged or chain.base
        out = f / f"model-{c['outtype'].upper()}.gguf"
        chain.f16 = out
        return Step(["convert", str(src), "--out", str(out), "--outtype", c["outtype"], "--no-register", "--json"],
                    f, {"model": out})
    if k == "quantize":
        out = f / f"model-{c['type']}.gguf"
        argv = ["quantize", str(chain.f16), str(out), "--type", c["type"], "--no-register", "--json"]
        if journey.eval.get("text"):
            argv += ["--eval-text", str(journey.eval["text"])]
        if c.get("calibration"):
            argv += ["--calibration", str(c["calibration"]), "--hf", str(chain.merged or chain.base)]
        chain.quant = out
        return Step(argv, f, {"model": out})
    raise JourneyError(f"stage {k}: no command runs it")


# -- evaluation ---------------------------------------------------------------------------

def _eval_flags(ev: dict, *, text: bool = True, prompts: bool = False) -> list[str]:
    out = []
    if text and ev.get("text"):
        out += ["--text", str(ev["text"]), "--ctx", str(ev.get("ctx", 256)), "--max-windows", str(ev.get("max_windows", 16))]
    if ev.get("tasks"):
        out += ["--tasks", ev["tasks"]]
        if ev.get("include_path"):
            out += ["--include-path", str(ev["include_path"])]
        if ev.get("limit"):
            out += ["--limit", str(ev["limit"])]
    if prompts and ev.get("prompts"):
        out += ["--prompts", str(ev["prompts"])]
    return out


def evaluations(kind: str, journey: Journey, chain: Chain, folder: Path) -> list[list[str]]:
    """The `crofter eval` commands that measure the stage just run ("base": the starting model)."""
    ev = journey.eval
    if not ev or kind == "reward":
        return []
    tail = ["--json", "--no-store"]
    if kind in ("base", "import"):
        cmds = [["eval", str(chain.base), *_eval_flags(ev), *tail]] if _eval_flags(ev) else []
        cmds += _base_prompts(ev, chain, folder, make=kind == "import")
        if ev.get("retrieval"):  # the collections do not change with the model: measured once, at the start
            cmds.append(["eval", "--retrieval", str(ev["retrieval"]), "-c", ev["collection"], "-k", str(ev.get("k", 5)), *tail])
        return cmds
    if kind in ("sft", "dpo", "grpo"):
        flags = _eval_flags(ev)
        cmds = [["eval", str(chain.base), "--adapter", str(chain.adapter / "adapter"), *flags, *tail]] if flags else []
        if ev.get("prompts") and chain.base_gguf is not None:
            # The suite runs through the chat, on llama.cpp: the adapter converted, on the base's GGUF.
            lora = folder / "adapter-F32.gguf"
            cmds += [["convert-lora", str(chain.adapter / "adapter"), "--base", str(chain.base), "--out", str(lora), "--json"],
                     ["eval", str(chain.base_gguf), "--adapter", str(lora), "--prompts", str(ev["prompts"]), *tail]]
        return cmds
    if kind == "merge":
        flags = _eval_flags(ev)
        return [["eval", str(chain.merged), *flags, *tail]] if flags else []
    if kind == "pretrain":  # a new base: its perplexity, and (for the suite and later adapters) its own GGUF
        flags = _eval_flags(ev)
        return ([["eval", str(chain.base), *flags, *tail]] if flags else []) + _base_prompts(ev, chain, folder, make=True)
    if kind == "convert":
        return [["eval", str(chain.f16), *_eval_flags(ev, prompts=True), *tail]]
    if kind == "quantize":
        ref = ["--reference", str(chain.f16)] if ev.get("text") else []
        return [["eval", str(chain.quant), *_eval_flags(ev, prompts=True), *ref, *tail]]
    return []


def _base_prompts(ev: dict, chain: Chain, folder: Path, make: bool) -> list[list[str]]:
    """The prompt suite on the base's GGUF; with `make`, the base is new (import, pretrain) and is
    converted here first, as the GGUF every later adapter stage's suite applies its adapter to."""
    if not ev.get("prompts"):
        return []
    cmds = []
    if make:
        chain.base_gguf = folder / "base-F16.gguf"
        cmds.append(_base_convert(chain.base, chain.base_gguf))
    if chain.base_gguf is None:
        return []
    return cmds + [["eval", str(chain.base_gguf), "--prompts", str(ev["prompts"]), "--json", "--no-store"]]


def _base_convert(src: Path, out: Path) -> list[str]:
    return ["convert", str(src), "--out", str(out), "--no-register", "--no-verify", "--json"]


def base_gguf_step(run_dir: Path, chain: Chain) -> Step:
    """The base converted to F16 (unverified, for its prompt suite only)."""
    out = run_dir / "00-base" / "base-F16.gguf"
    chain.base_gguf = out
    return Step(_base_convert(chain.base, out), out.parent, {"model": out})

"""A peft LoRA adapter (safetensors) -> a GGUF adapter llama.cpp loads with `lora_path=`.

llama.cpp applies W x + s * B (A x) with s = alpha / r (times the user's scale), and
reads alpha from ``adapter.lora.alpha`` and r from the tensors. peft's rsLoRA uses
s = alpha / sqrt(r), so the alpha written is alpha * sqrt(r). For llama-family models
the converter permutes q/k rows of the base weights; an adapter's B matrix has the
same output rows, so lora_b of q/k is permuted the same way (lora_a is untouched).

Refused, with a message that says to merge instead: DoRA (magnitude vectors llama.cpp
does not apply), adapters that train or add token embeddings, per-layer ranks or
alphas (rank_pattern/alpha_pattern), and pickled adapter weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .hf import ConvertError, open_checkpoint, permute_rows

MERGE_HINT = "merge the adapter into the base (`crofter tune merge`) and convert the merged model instead"


@dataclass
class LoraResult:
    path: Path
    tensors: int
    rank: int
    alpha_written: float


def _adapter_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise ConvertError(f"{folder}: no adapter_config.json (expected a peft LoRA adapter folder)") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{folder}/adapter_config.json: not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{folder}: peft_type {cfg.get('peft_type')} is not LoRA")
    if cfg.get("use_dora"):
        raise ConvertError(f"{folder}: DoRA adapters cannot be applied by llama.cpp; {MERGE_HINT}")
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        raise ConvertError(f"{folder}: this adapter trains full modules or token embeddings "
                           f"({cfg.get('modules_to_save') or 'trainable_token_indices'}); {MERGE_HINT}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConvertError(f"{folder}: per-layer ranks or alphas are not representable in a GGUF adapter; {MERGE_HINT}")
    return cfg


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out: str | Path | None = None) -> LoraResult:
    import gguf
    from safetensors import safe_open

    from .convert import _arch
    from .tensor_write import check_finite
    from .output import output_file

    adapter = Path(adapter_dir).expanduser()
    cfg = _adapter_config(adapter)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        if any(adapter.glob("adapter_model.bin")):
            raise ConvertError(f"{adapter}: pickled adapter weights (adapter_model.bin) are refused; save with safetensors")
        raise ConvertError(f"{adapter}: no adapter_model.safetensors")
    ck = open_checkpoint(base_dir)
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    alpha_written = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha
    tmap = gguf.get_tensor_name_map(_arch(ck.plan.gguf_arch), ck.n_layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if m is None:
                if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                    raise ConvertError(f"{weights.name}: {key} changes token embeddings; {MERGE_HINT}")
                raise ConvertError(f"{weights.name}: unexpected tensor {key!r}; {MERGE_HINT}")
            module, which = m.group(1), m.group(2)
            name = tmap.get_name(module)
            if name is None:
                raise ConvertError(f"{weights.name}: module {module!r} has no llama.cpp name for {ck.arch_name}")
            arr = f.get_tensor(key).float().numpy()
            check_finite(arr, weights, key)
            pairs.setdefault(name, {})[which] = arr
    if not pairs:
        raise ConvertError(f"{weights}: no LoRA tensors")
    out = Path(out) if out else adapter.parent / f"{adapter.name}.gguf"
    with output_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), ck.plan.gguf_arch)
        try:
            n = _write_adapter(w, ck, pairs, weights, adapter.name, alpha_written)
        except BaseException:
            for fh in w.fout or []:  # close without the writer's flush: nothing more is written
                with contextlib.suppress(OSError):
                    fh.close()
            raise
        w.close()
    return LoraResult(out, n, r, alpha_written)


def _write_adapter(w, ck, pairs: dict[str, dict[str, np.ndarray]], weights: Path, name: str, alpha: float) -> int:
    import gguf

    w.add_string(gguf.Keys.General.TYPE, "adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name)
    n = 0
    for tname in sorted(pairs):
        ab = pairs[tname]
        if set(ab) != {"A", "B"}:
            raise ConvertError(f"{weights.name}: {tname} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]  # A: (r, in), B: (out, r)
        if ck.plan.permute_qk and (tname.endswith(".attn_q") or tname.endswith(".attn_k")):
            b = permute_rows(b, ck.n_head if tname.endswith(".attn_q") else ck.n_head_kv)
        w.add_tensor(f"{tname}.weight.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(f"{tname}.weight.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        n += 2
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    return n

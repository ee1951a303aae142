"""How far each LoRA module moves its weight: ||B·A||_F × scaling, read from the adapter's files alone.

A LoRA module adds ΔW = s·B·A to a frozen weight W (Hu et al. 2021, arXiv:2106.09685): A is
(r, in), B is (out, r), s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023).
The Frobenius norm goes through r×r Gram matrices instead of the (out, in) product::

    ||B A||_F² = trace(Aᵀ BᵀB A) = sum((BᵀB) ⊙ (A Aᵀ))

so a 4096×4096 module costs two r×r products. No model is loaded: adapter_config.json and
adapter_model.safetensors are all it reads.

    >>> lora_norms(Path("runs/persona/adapter"))["modules"][0]      # doctest: +SKIP
    {'module': 'model.layers.29.self_attn.v_proj', 'norm': 0.41, 'rank': 8, 'scaling': 2.0}
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError

# peft's saved names: base_model.model.<module>.lora_A.weight (lora_embedding_A for an embedding)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern rule: a key matches a module name it ends (after a dot)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(adapter: Path) -> tuple[dict[str, tuple], dict]:
    """({module: (A, B, scaling)} as float64 tensors, adapter_config) of a peft adapter folder."""
    import torch
    from safetensors import SafetensorError, safe_open

    cfg_path = adapter / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: unreadable ({exc})") from None
    weights = adapter / ADAPTER_WEIGHTS
    pairs: dict[str, dict] = {}
    try:
        with safe_open(str(weights), framework="pt") as fh:
            names = fh.keys()  # a safe_open handle, not a dict
            for key in names:
                m = _KEY.match(key)
                if m:
                    pairs.setdefault(m["module"], {})[m["ab"]] = fh.get_tensor(key).to(torch.float64)
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{weights}: unreadable ({exc})") from None
    alpha0, rslora = cfg.get("lora_alpha", cfg.get("r", 8)), bool(cfg.get("use_rslora"))
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{weights}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                               "do not multiply (expected (r, in) and (out, r))")
        r = a.shape[0]  # the saved rank, which rank_pattern set
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha0)
        out[module] = (a, b, alpha / math.sqrt(r) if rslora else alpha / r)
    if not out:
        raise AdapterError(f"{weights}: no LoRA A/B tensors in it")
    return out, cfg


def delta_norm(a, b, scaling: float) -> float:
    """||scaling · b @ a||_F through the r×r Gram matrices (float64)."""
    sq = float(((b.T @ b) * (a @ a.T)).sum())
    return abs(scaling) * math.sqrt(max(sq, 0.0))


def _table(norms: dict[str, float], extra: dict[str, dict]) -> dict:
    rows = sorted(({"module": m, "norm": n, **extra.get(m, {})} for m, n in norms.items()),
                  key=lambda r: (-r["norm"] if math.isfinite(r["norm"]) else -math.inf, r["module"]))
    return {"modules": rows, "total": math.sqrt(sum(n * n for n in norms.values())), "count": len(rows)}


def lora_norms(adapter: Path) -> dict:
    """Each module's ||ΔW||_F, largest first, with its rank and scaling; `total` is ||ΔW|| over all
    modules; `dora` says the adapter also rescales columns (DoRA), which these norms leave out."""
    mods, cfg = read_lora(adapter)
    norms = {m: delta_norm(a, b, s) for m, (a, b, s) in mods.items()}
    extra = {m: {"rank": a.shape[0], "scaling": s} for m, (a, b, s) in mods.items()}
    return {"adapter": str(adapter), "dora": bool(cfg.get("use_dora")), **_table(norms, extra)}


def lora_change(before: Path, after: Path) -> dict:
    """Per module ||ΔW_after - ΔW_before||_F: what one adapter changed relative to another on the
    same base (an SFT adapter and the DPO run that continued it). A module in only one counts whole.

    Δ_after - Δ_before = [s₂B₂, -s₁B₁] @ [A₂; A₁], so the Gram formula still applies."""
    import torch

    m1, _ = read_lora(before)
    m2, _ = read_lora(after)
    norms = {}
    for module in sorted(set(m1) | set(m2)):
        if module not in m1 or module not in m2:
            a, b, s = (m2 if module in m2 else m1)[module]
            norms[module] = delta_norm(a, b, s)
            continue
        (a1, b1, s1), (a2, b2, s2) = m1[module], m2[module]
        if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
            raise AdapterError(f"{after}: {module} has another shape than in {before}: not the same base")
        norms[module] = delta_norm(torch.cat([a2, a1]), torch.cat([s2 * b2, -s1 * b1], dim=1), 1.0)
    return {"before": str(before), "after": str(after), **_table(norms, {})}

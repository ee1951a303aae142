"""Reading a Hugging Face checkpoint folder: config, architecture plan, lazily loaded tensors.

Only safetensors are read: pickled .bin/.pt/.pth/.ckpt weights are never opened (loading
one can run code), and an architecture that exists only as the checkpoint's own Python
(`auto_map`, "trust_remote_code") is refused for the same reason. Tensors are opened one at a time with `safe_open`, so peak memory stays near
the largest single tensor, not the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


class ConvertError(Exception):
    """The checkpoint cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class ArchPlan:
    gguf_arch: str  # name in gguf.MODEL_ARCH_NAMES
    permute_qk: bool  # HF rotate-half q/k rows -> llama.cpp's interleaved RoPE pairs
    transpose: tuple[str, ...] = ()  # weights HF keeps as Conv1D (in, out); llama.cpp wants (out, in)
    aliases: tuple[tuple[str, str], ...] = ()  # (the Llama-style config key, this family's own key)
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by the stored w


# GPT-2's config.json spells the sizes its own way (n_embd, n_layer, ...).
GPT2_ALIASES = (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head"),
                ("max_position_embeddings", "n_positions"), ("intermediate_size", "n_inner"))

# What crofter converts, and how. Mistral is written as llama (same graph in llama.cpp);
# Qwen2 uses NEOX-style RoPE in llama.cpp, so its q/k rows stay as they are. GPT-2 has
# learned positions (no RoPE), fused q/k/v (`c_attn`) and Conv1D layers stored transposed.
ARCHITECTURES = {
    "LlamaForCausalLM": ArchPlan("llama", True),
    "MistralForCausalLM": ArchPlan("llama", True),
    "Qwen2ForCausalLM": ArchPlan("qwen2", False),
    "Qwen3ForCausalLM": ArchPlan("qwen3", False),  # Qwen2's graph without q/k/v biases, plus per-head q/k RMSNorm
    # Gemma 3 (text): NEOX RoPE, q/k norms, norms around attention and MLP, embeddings scaled by
    # sqrt(hidden) in the graph, sliding-window layers with their own RoPE base.
    "Gemma3ForCausalLM": ArchPlan("gemma3", False, norm_plus_one=True),
    "GPT2LMHeadModel": ArchPlan("gpt2", False, (".c_attn.weight", ".c_proj.weight", ".c_fc.weight"), GPT2_ALIASES),
}
# llama.cpp's GPT-2 graph: GELU (tanh form, which "gelu" differs from by < 1e-3 per activation),
# 1/sqrt(head_dim) attention scale, nothing layer-dependent.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    arch_name: str
    plan: ArchPlan
    shards: list[Path]

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.n_head)

    def _rope_params(self) -> dict:
        params = self.config.get("rope_parameters") or {}
        return params.get("full_attention", params)  # Gemma 3: per layer type; the global layers' here

    def rope_theta(self) -> float:
        return float(self.config.get("rope_theta") or self._rope_params().get("rope_theta") or 10000.0)

    def rope_scaling(self) -> dict | None:
        """The rope scaling dict (transformers 4 `rope_scaling` or 5 `rope_parameters`), None if plain."""
        rs = self.config.get("rope_scaling") or self._rope_params() or None
        if not rs:
            return None
        kind = rs.get("rope_type") or rs.get("type") or "default"
        return None if kind == "default" else {**rs, "rope_type": kind}


def open_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder (expected an HF checkpoint with config.json and *.safetensors)")
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{folder}: no config.json") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{cfg_path}: not valid JSON ({exc})") from None
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and config.get("auto_map"):
        refs = [v for vs in config["auto_map"].values() for v in (vs if isinstance(vs, list) else [vs])]
        code = sorted({v.split("--")[-1].split(".")[0] + ".py" for v in refs if isinstance(v, str)})
        raise ConvertError(f"{cfg_path}: architecture {archs or config.get('model_type')} exists only as the "
                           f"checkpoint's own Python code (auto_map: {', '.join(code) or 'remote code'}); crofter never "
                           f"runs a checkpoint's code and converts {', '.join(ARCHITECTURES)}")
    if arch is None:
        raise ConvertError(f"{cfg_path}: architecture {archs or config.get('model_type')} is not supported "
                           f"(crofter converts {', '.join(ARCHITECTURES)})")
    plan = ARCHITECTURES[arch]
    config = _normalized(config, plan)
    if plan.gguf_arch == "gpt2":
        _check_gpt2(config, cfg_path)
    if plan.gguf_arch == "gemma3":
        _check_gemma3(config, cfg_path)
    shards = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not shards:
        if pickles:
            raise ConvertError(f"{folder}: only pickled weights ({', '.join(pickles[:3])}); crofter refuses them "
                               "because loading a pickle can run code. Re-save the model with safetensors.")
        raise ConvertError(f"{folder}: no *.safetensors weights")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ConvertError(f"{cfg_path}: field {key!r} missing or not a positive integer")
    return Checkpoint(folder, config, arch, plan, shards)


def _normalized(config: dict, plan: ArchPlan) -> dict:
    """A copy of `config` with the Llama-style size keys filled in from the family's own."""
    c = dict(config)
    for std, own in plan.aliases:
        if c.get(std) is None and c.get(own) is not None:
            c[std] = c[own]
    if plan.gguf_arch == "gpt2" and c.get("intermediate_size") is None and isinstance(c.get("hidden_size"), int):
        c["intermediate_size"] = 4 * c["hidden_size"]  # n_inner null means 4 x n_embd
    return c


def _check_gemma3(config: dict, cfg_path: Path) -> None:
    """Gemma 3 settings llama.cpp's gemma3 graph hard-codes (every 6th layer global, local RoPE base
    10000, 1/sqrt(head_dim) attention scale, no soft-capping): anything else is refused by name."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if config.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise ConvertError(f"{cfg_path}: query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from head_dim "
                           f"{head_dim}; llama.cpp's gemma3 graph scales attention by 1/sqrt(head_dim)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key) is not None:
            raise ConvertError(f"{cfg_path}: {key} is set; llama.cpp's gemma3 graph does not soft-cap")
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config["num_hidden_layers"])]
    if config.get("layer_types") not in (None, want):
        raise ConvertError(f"{cfg_path}: layer_types is not Gemma 3's (every 6th layer global), which llama.cpp assumes")
    local = ((config.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta",
                                                                                  config.get("rope_local_base_freq", 10000.0))
    if float(local) != 10000.0:
        raise ConvertError(f"{cfg_path}: the sliding layers' rope_theta {local} is not 10000, which llama.cpp assumes")


def _check_gpt2(config: dict, cfg_path: Path) -> None:
    """GPT-2 variants whose graph llama.cpp's `gpt2` does not compute are refused, naming the field."""
    act = config.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConvertError(f"{cfg_path}: activation_function {act!r} is not GPT-2's GELU; llama.cpp's gpt2 graph "
                           f"computes {', '.join(GPT2_ACTIVATIONS)} only")
    for key, want in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                      ("add_cross_attention", False)):
        if bool(config.get(key, want)) != want:
            raise ConvertError(f"{cfg_path}: {key}={config.get(key)} is not computed by llama.cpp's gpt2 graph")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half RoPE layout to llama.cpp's pairs.

    Within each head of `d` rows HF rotates row i with row i + d/2; llama.cpp's LLAMA
    RoPE rotates rows 2i and 2i+1. Viewing a head's rows as (2, d/2) and transposing
    to (d/2, 2) interleaves the halves. w: (n_head * d, n_in) -> same shape; a bias
    (n_head * d,) works the same way.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_checkpoint(gguf_path: str | Path, out: str | Path) -> Path:
    """Dequantize a GGUF (one transformers can read) into an HF safetensors checkpoint folder,
    tokenizer and chat template included: how the bundled SmolLM2 becomes a trainable model.
    A SentencePiece vocabulary (Gemma) also gets its tokenizer.model back (spm_rebuild).

    transformers loads the GGUF with a quantization config attached; the model is rebuilt
    from the config without it and given the dequantized weights, so it saves as a plain
    float32 checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_path, out = Path(gguf_path), Path(out)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    from .spm_rebuild import spm_model_from_gguf

    spm = spm_model_from_gguf(gguf_path)  # a SentencePiece vocabulary: its tokenizer.model, for convert
    if spm is not None:
        (out / "tokenizer.model").write_bytes(spm)
    return out

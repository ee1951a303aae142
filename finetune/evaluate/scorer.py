"""Next-token predictions of a model over token sequences: the one primitive that
perplexity, KL against a reference and lm-eval's loglikelihood requests all need.

`GGUFScorer` runs the GGUF in llama.cpp and asks for logits only where they are
scored. It keeps what is in the KV cache between calls, so a sequence that starts
with the last one's tokens (the four endings of one HellaSwag item, the few-shot
examples every item shares) evaluates only its new tokens. `HFScorer` runs an HF
checkpoint (optionally with a LoRA adapter, not merged) in torch on the same token
ids, so the two give comparable numbers.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .rows import EvalError


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class HFScorer:
    kind = "hf"

    def __init__(self, folder: str | Path, adapter: str | Path | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(folder)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.to(device).eval()
        self.device = device
        self.n_ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.n_vocab = int(model.config.vocab_size)
        self.decoded = 0

    @property
    def bos_id(self) -> int | None:
        t = self.tokenizer
        probe = t("a").input_ids
        return t.bos_token_id if t.bos_token_id is not None and probe and probe[0] == t.bos_token_id else None

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def forget(self) -> None:
        pass

    def predict(self, tokens: list[int], start: int) -> np.ndarray:
        torch = self.torch
        body = torch.tensor([tokens[:len(tokens) - 1]], device=self.device)
        with torch.no_grad():
            logits = self.model(body).logits[0, start - 1:]
        self.decoded += body.shape[1]
        return logits.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def open_scorer(model: str | Path, adapter: str | Path | None = None, n_ctx: int = 2048,
                gpu_layers: int = 0, reuse_prefix: bool = True):
    """A GGUF file -> GGUFScorer (a GGUF LoRA adapter through llama.cpp); an HF folder -> HFScorer."""
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EvalError(f"{p}: not an HF checkpoint folder (no config.json)")
        return HFScorer(p, adapter)
    if not p.is_file():
        raise EvalError(f"{p}: no such file")
    if adapter and Path(adapter).is_dir():
        raise EvalError(f"{adapter}: a peft adapter folder needs the HF base; for a GGUF use a GGUF adapter "
                        "(crofter convert-lora)")
    from models.info import gguf_info

    from .llama_scorer import GGUFScorer

    # Unquantized weights get an F32 KV cache, so that the GGUF scores what its
    # checkpoint scores; quantized ones keep llama.cpp's F16 cache, as in the chat.
    exact = str(gguf_info(p).get("quantization") or "").upper() in ("ALL_F32", "F32", "F16", "BF16")
    return GGUFScorer(p, n_ctx=n_ctx, gpu_layers=gpu_layers, lora=adapter, reuse_prefix=reuse_prefix, kv_f32=exact)


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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class GGUFScorer:
    kind = "gguf"

    def __init__(self, path: str | Path, n_ctx: int = 2048, gpu_layers: int = 0, lora: str | Path | None = None,
                 reuse_prefix: bool = True, n_threads: int | None = None, kv_f32: bool = False):
        from llama_cpp import Llama

        self.path = Path(path)
        n_batch = min(n_ctx, 512)
        # An F16 KV cache rounds every key and value: ~5e-3 on a token's log-probability,
        # more than the checkpoint-vs-GGUF comparison should carry. F32 costs memory only.
        kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                             logits_all=False, n_threads=n_threads or threads(),
                             n_threads_batch=n_threads or threads(), n_gpu_layers=gpu_layers,
                             lora_path=str(lora) if lora else None, seed=0, verbose=False, **kv)
        except ValueError as e:
            raise EvalError(f"{self.path}: llama.cpp could not load it ({e})") from None
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.n_batch = n_batch
        self.reuse_prefix = reuse_prefix
        self._tokens: list[int] = []          # what the KV cache holds (sequence 0)
        self._rows: dict[int, np.ndarray] = {}  # logits kept by position, for reuse
        self.decoded = 0                      # tokens actually evaluated (reuse shows here)

    @property
    def bos_id(self) -> int | None:
        """The token llama.cpp puts first in a sequence for this model, if any."""
        return self.llm.token_bos() if self.llm._model.add_bos_token() else None

    @property
    def eos_id(self) -> int:
        return self.llm.token_eos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def forget(self) -> None:
        """Drop the kept KV cache (before something else, such as generation, uses the context)."""
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        self.llm.n_tokens = 0
        self._tokens, self._rows = [], {}

    def predict(self, tokens: list[int], start: int) -> np.ndarray:
        """Raw logits predicting tokens[start:], shape (len(tokens) - start, n_vocab).

        Row i comes from position start - 1 + i; the last token itself is never
        evaluated (nothing after it is scored)."""
        n = len(tokens)
        if not 1 <= start < n + 1:
            raise ValueError(f"start {start} outside 1..{n}")
        if n > self.n_ctx + 1:
            raise ValueError(f"{n} tokens do not fit a context of {self.n_ctx}")
        body = tokens[:n - 1]
        need = range(start - 1, n - 1)
        keep = _common_prefix(body, self._tokens) if self.reuse_prefix else 0
        for j in need:  # a needed row that was never computed forces its position to be evaluated
            if j < keep and j not in self._rows:
                keep = j
                break
        self.llm._ctx.kv_cache_seq_rm(-1, keep, -1)
        self._tokens = self._tokens[:keep]
        self._rows = {j: r for j, r in self._rows.items() if j < keep and j >= start - 1}
        self._decode(body[keep:], keep, start - 1)
        return np.stack([self._rows[j] for j in need]) if len(need) else np.zeros((0, self.n_vocab), np.float32)

    def _decode(self, new: list[int], n_past: int, want_from: int) -> None:
        ctx, batch = self.llm._ctx, self.llm._batch
        for i in range(0, len(new), self.n_batch):
            piece = new[i:i + self.n_batch]
            pos0 = n_past + i
            batch.set_batch(batch=piece, n_past=pos0, logits_all=False)
            wanted = [k for k in range(len(piece)) if pos0 + k >= want_from]
            for k in range(len(piece)):
                batch.batch.logits[k] = pos0 + k >= want_from
            if not wanted:  # llama.cpp wants at least the last one; it is simply not kept
                batch.batch.logits[len(piece) - 1] = True
            ctx.decode(batch)
            self.decoded += len(piece)
            out = np.ctypeslib.as_array(ctx.get_logits(), shape=(max(len(wanted), 1) * self.n_vocab,))
            out = out.reshape(-1, self.n_vocab)
            for row, k in enumerate(wanted):
                self._rows[pos0 + k] = out[row].copy()
            self._tokens.extend(piece)
        self.llm.n_tokens = len(self._tokens)

    def close(self) -> None:
        self.llm.close()


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

    # Unquantized weights get an F32 KV cache, so that the GGUF scores what its
    # checkpoint scores; quantized ones keep llama.cpp's F16 cache, as in the chat.
    exact = str(gguf_info(p).get("quantization") or "").upper() in ("ALL_F32", "F32", "F16", "BF16")
    return GGUFScorer(p, n_ctx=n_ctx, gpu_layers=gpu_layers, lora=adapter, reuse_prefix=reuse_prefix, kv_f32=exact)

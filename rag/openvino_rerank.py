"""A cross-encoder compiled by OpenVINO, as the embedder is (rag/openvino_embed.py).

A reranker reads the question with each of the 20 best passages, so on a CPU it costs more than
the search before it: float32 torch took 670 ms for 20 passages of 128 tokens on a 2-core
AVX512-BF16 EPYC. The same model exported once to ONNX (with its classification head) and
compiled for the CPU, in bf16 where the CPU has it, runs the same pairs several times faster
(docs/benchmarks.md, session 20). Only plain Hugging Face sequence-classification folders are
compiled; a folder sentence-transformers saved with extra modules runs on torch.
"""
from __future__ import annotations

from pathlib import Path

from .onnx_embed import by_length, default_cache, fingerprint, made_again_once, write_onnx
from .openvino_embed import MAX_BATCH, compile_for_cpu, import_runtime


def compilable(ce) -> bool:
    """Is this CrossEncoder one transformer with its own classification head (what is exported),
    with no prompt that sentence-transformers would put before the text (the export reads the pair
    as it is)?"""
    mods = list(ce)
    if getattr(ce, "default_prompt_name", None) or any((getattr(ce, "prompts", None) or {}).values()):
        return False
    return len(mods) == 1 and type(getattr(mods[0], "auto_model", None)).__name__.endswith("ForSequenceClassification")


class OpenVinoScorer:
    """`scores(query, passages)` like `CrossEncoder.predict` with raw logits, run by OpenVINO.
    Not thread-safe: rag/rerank.py's Reranker calls it under its lock."""

    def __init__(self, ce, folder: Path, cache: Path | None = None):
        ov = import_runtime()
        self.tokenizer = ce.tokenizer
        # sentence-transformers 6 names it max_seq_length (max_length warns); 5 has only max_length.
        limit = ce.max_seq_length if hasattr(type(ce), "max_seq_length") else getattr(ce, "max_length", None)
        self.max_length = int(limit or 512)
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in self.tokenizer.model_input_names]
        fp32 = (cache or default_cache()) / f"{folder.name}-{fingerprint(folder)}" / "reranker.onnx"
        made_again_once(lambda: self._compile(ov, ce, fp32), fp32)
        self.path = fp32

    def _compile(self, ov, ce, fp32: Path) -> None:
        if not fp32.is_file():
            export(ce, fp32, self.input_names)
        compiled = compile_for_cpu(ov, fp32)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._request = compiled.create_infer_request()
        self._compiled = compiled

    def scores(self, query: str, passages: list[str]) -> list[float]:
        import numpy as np

        lengths = [len(ids) for ids in self.tokenizer([query] * len(passages), passages, truncation=True,
                                                       max_length=self.max_length)["input_ids"]]
        out = [0.0] * len(passages)
        for idx in by_length(lengths, MAX_BATCH):
            enc = self.tokenizer([query] * len(idx), [passages[j] for j in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            logits = self._request.infer({n: enc[n].astype(np.int64) for n in self.input_names})[0]
            for j, s in zip(idx, logits[:, 0]):
                out[j] = float(s)
        return out


def export(ce, dst: Path, input_names: list[str]) -> None:
    """The cross-encoder's model, head included, as a float32 ONNX file at `dst`; output the
    logits, (batch, labels)."""
    sample = ce.tokenizer(["a question", "another question"], ["a short passage", "a somewhat longer passage to pad"],
                          padding=True, return_tensors="pt")
    write_onnx(ce[0].auto_model, lambda out: out.logits, sample, dst, input_names, ("logits", {0: "batch"}))

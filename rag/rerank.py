"""An optional cross-encoder that re-reads the fused candidates with the question.

The bundled MiniLM embeds a question and a passage apart, so it cannot tell which of a file's
passages answers a question worded unlike it (docs/benchmarks.md, the held-out set). A
cross-encoder reads both together: a sentence-transformers ``CrossEncoder`` folder with one
output, such as ``cross-encoder/ms-marco-MiniLM-L6-v2`` (``crofter models pull`` fetches one
while online; nothing is downloaded here). Scores are the model's raw logits, so strong matches
stay apart instead of all rounding to a sigmoid's 1.0.

    >>> Reranker("~/models/ms-marco-MiniLM-L6-v2").scores("q", ["a", "b"])   # doctest: +SKIP
    [-3.1, 7.4]
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from .embed import EmbedError, pick_device, quiet_offline

RERANK_BACKENDS = ("auto", "torch", "openvino")


def check_folder(folder: str | Path) -> Path:
    """The folder, if it can hold a cross-encoder with one output; else EmbedError naming what it
    is instead. A plain encoder (an embedder's BERT) would load as a CrossEncoder with a new,
    random head and rank passages at random. A folder sentence-transformers saved as a CrossEncoder
    (a trained scoring layer on an encoder, or a causal LM scored by its yes/no logits) is judged
    by its outputs once loaded."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise EmbedError(f"reranker {folder}: not a folder")
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbedError(f"reranker {path}: no config.json, so not a cross-encoder folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EmbedError(f"reranker {cfg_path}: unreadable ({exc})") from None
    if not isinstance(cfg, dict):
        raise EmbedError(f"reranker {cfg_path}: not a JSON object")
    if not any(path.glob("*.safetensors")):
        raise EmbedError(f"reranker {path}: no .safetensors weights (pickled weights are never loaded)")
    if (path / "modules.json").is_file() and _saved_type(path) == "CrossEncoder":
        return path
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        what = ", ".join(map(str, archs)) or "no architecture"
        raise EmbedError(f"reranker {path}: a {what} model, not a cross-encoder (a ...ForSequenceClassification "
                         "model with one output, e.g. cross-encoder/ms-marco-MiniLM-L6-v2)")
    # transformers' own default: a config without id2label has two labels.
    labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    if labels != 1:
        raise EmbedError(f"reranker {path}: a classifier with {labels} outputs; a reranker scores with one")
    return path


def _saved_type(path: Path) -> str:
    """The model type sentence-transformers saved with a modules.json folder ("SentenceTransformer"
    for an embedder, which older folders do not write down)."""
    try:
        cfg = json.loads((path / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "SentenceTransformer"
    return str(cfg.get("model_type", "SentenceTransformer")) if isinstance(cfg, dict) else "SentenceTransformer"


class Reranker:
    """A local cross-encoder; `scores(query, passages)` gives one relevance score a passage.

    `backend`: torch (sentence-transformers itself, float32), openvino (rag/openvino_rerank.py:
    exported once into `cache` and compiled for the CPU, bf16 where the CPU has it) or auto
    (openvino on a CPU where it is installed and the folder is a plain classifier, else torch;
    should OpenVINO fail, torch runs and `fallback` says why). `backend` then names what runs.

    Shared between serve's request threads, it predicts for one at a time: the compiled model's
    infer request is not thread-safe, and the fast tokenizer sets its padding and truncation
    state on first use without being documented as thread-safe (with torch, six threads' first
    calls on five fresh loads never failed without the lock; it is kept as a precaution there)."""

    def __init__(self, folder: str | Path, device: str | None = None, backend: str = "torch",
                 cache: Path | None = None):
        if backend not in RERANK_BACKENDS:
            raise EmbedError(f"reranker backend must be one of {', '.join(RERANK_BACKENDS)}, not {backend!r}")
        path = check_folder(folder)
        quiet_offline()
        import torch
        from sentence_transformers import CrossEncoder

        self.path = path
        self.fallback = ""
        self._lock = threading.Lock()
        device = "cpu" if backend == "openvino" else device or pick_device()
        try:
            self.model = CrossEncoder(str(path), device=device, local_files_only=True,
                                      activation_fn=torch.nn.Identity())
        except Exception as exc:
            raise EmbedError(f"cannot load reranker {path}: {exc}") from None
        if self.model.num_labels != 1:
            raise EmbedError(f"reranker {path}: scores with {self.model.num_labels} outputs; a reranker scores with one")
        self.scorer = None  # the compiled model (rag/openvino_rerank.py) when openvino runs
        self.backend = "torch"
        if backend == "torch" or (backend == "auto" and device != "cpu"):
            return
        from .openvino_rerank import OpenVinoScorer, compilable

        try:
            if not compilable(self.model):
                raise EmbedError("only a plain ...ForSequenceClassification folder is compiled; this one has "
                                 "sentence-transformers modules or prompts of its own")
            self.scorer = OpenVinoScorer(self.model, path, cache)
            self.backend = "openvino"
        except Exception as exc:
            reason = f"{exc.name or 'openvino'} is not installed" if isinstance(exc, ImportError) else str(exc)
            if backend == "openvino":
                raise EmbedError(f"reranker {path}: cannot run on openvino: {reason}") from None
            self.fallback = f"openvino: {reason}"

    def scores(self, query: str, passages: list[str]) -> list[float]:
        if not passages:
            return []
        with self._lock:
            if self.scorer is not None:
                try:
                    return self.scorer.scores(query, passages)
                except Exception as exc:  # the compiled model failed where the torch one is still loaded
                    self.scorer, self.backend = None, "torch"
                    self.fallback = f"openvino failed while scoring: {exc}"
            out = self.model.predict([(query, p) for p in passages], show_progress_bar=False)
        return [float(s) for s in out]

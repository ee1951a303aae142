"""An optional cross-encoder that re-reads the fused candidates with the question.

The bundled MiniLM embeds a question and a passage apart, so it cannot tell which of a file's
passages answers a question worded unlike it (docs/benchmarks.md, the held-out set). A
cross-encoder reads both together: a sentence-transformers ``CrossEncoder`` folder with one
output, such as ``cross-encoder/ms-marco-MiniLM-L6-v2`` (``crofter models pull`` fetches one
while online; nothing is downloaded here).

    >>> Reranker("~/models/ms-marco-MiniLM-L6-v2").scores("q", ["a", "b"])   # doctest: +SKIP
    [-3.1, 7.4]
"""
from __future__ import annotations

import json
from pathlib import Path

from .embed import EmbedError, pick_device, quiet_offline


def check_folder(folder: str | Path) -> Path:
    """The folder, if its config describes a one-output sequence classifier; else EmbedError
    naming what it is instead. Loading anything else as a CrossEncoder would succeed with a new,
    random head and rank passages at random."""
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
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        what = ", ".join(map(str, archs)) or "no architecture"
        raise EmbedError(f"reranker {path}: a {what} model, not a cross-encoder (a ...ForSequenceClassification "
                         "model with one output, e.g. cross-encoder/ms-marco-MiniLM-L6-v2)")
    labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 1)
    if labels != 1:
        raise EmbedError(f"reranker {path}: a classifier with {labels} outputs; a reranker scores with one")
    return path


class Reranker:
    """A local cross-encoder; `scores(query, passages)` gives one relevance score a passage."""

    def __init__(self, folder: str | Path, device: str | None = None):
        path = check_folder(folder)
        quiet_offline()
        from sentence_transformers import CrossEncoder

        self.path = path
        try:
            self.model = CrossEncoder(str(path), device=device or pick_device(), local_files_only=True)
        except Exception as exc:
            raise EmbedError(f"cannot load reranker {path}: {exc}") from None

    def scores(self, query: str, passages: list[str]) -> list[float]:
        if not passages:
            return []
        return [float(s) for s in self.model.predict([(query, p) for p in passages], show_progress_bar=False)]

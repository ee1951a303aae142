"""/v1/embeddings: the documents' embedder (Settings.embedder, all-MiniLM-L6-v2 by default).

Vectors are the embedder's own (unit length, its dimension); `encoding_format: "base64"`
(what the openai client asks for by default) is the float32 little-endian bytes, base64.
The model name a client sends must be the embedder's name (it is listed in /v1/models).
"""
from __future__ import annotations

import base64
import threading
import time

import numpy as np

from .errors import ApiError

MAX_INPUTS = 2048
MAX_CHARS = 100_000  # per input


class Embeddings:
    """The server's embedder, loaded on first use; encoding is serialized (one model)."""

    def __init__(self, name: str, backend: str = "auto"):
        self.name = name
        self.backend = backend
        self._lock = threading.Lock()
        self._model = None

    def model(self):
        with self._lock:
            if self._model is None:
                from .. import documents

                self._model = documents.embedder(self.name, self.backend)
            return self._model

    def inputs(self, req) -> list[str]:
        data = req.input
        texts = [data] if isinstance(data, str) else list(data)
        if not texts:
            raise ApiError(400, "input: must not be empty", "input")
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input: token ids are not supported; send text", "input")
        if len(texts) > MAX_INPUTS:
            raise ApiError(400, f"input: at most {MAX_INPUTS} texts per request, got {len(texts)}", "input")
        for i, t in enumerate(texts):
            if len(t) > MAX_CHARS:
                raise ApiError(400, f"input.{i}: {len(t)} characters; the most is {MAX_CHARS}", f"input.{i}")
        return texts

    def run(self, req) -> dict:
        """The response body (blocking: call it on a worker thread)."""
        if req.model != self.name:
            raise ApiError(404, f"model {req.model!r} is not an embedding model here (use {self.name!r})", "model",
                           "model_not_found")
        texts = self.inputs(req)
        model = self.model()
        if req.dimensions is not None and req.dimensions != model.dimension:
            raise ApiError(400, f"dimensions: {self.name} gives {model.dimension}-dimensional vectors", "dimensions")
        with self._lock:
            vectors = np.asarray(model.encode(texts), dtype=np.float32)
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])  # the embedder's own tokens
        return {"object": "list", "data": data, "model": self.name, "created": int(time.time()),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

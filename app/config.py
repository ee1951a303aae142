"""Typed settings: one TOML file, every value overridable by a command-line flag.

    $ crofter config set temperature 0.2
    $ crofter config show

An unknown key or a bad value is refused with a message naming the key. The file
is written atomically, so a crash never leaves half a config behind.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from models import atomic, paths
from models.bundled import BUNDLED_NAME


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names the key."""


def _doc(text: str, **kw):
    return field(metadata={"doc": text}, **kw)


@dataclass
class Settings:
    """Defaults for every command; a flag given on the command line wins."""

    model: str = _doc("Model used when none is named: a registry name or a path.", default=BUNDLED_NAME)
    system_prompt: str = _doc("System prompt for new chats (empty for none).", default="")
    n_ctx: int = _doc("Context window in tokens (0: the model's trained length, capped at 8192).", default=4096)
    threads: int = _doc("CPU threads for inference (0: every CPU this process may use).", default=0)
    gpu_layers: int = _doc("Layers offloaded to the GPU (-1: all when the build supports it, 0: CPU only).", default=-1)
    temperature: float = _doc("Sampling temperature; 0 is greedy.", default=0.7)
    top_p: float = _doc("Nucleus sampling: keep the smallest set of tokens with this total probability.", default=0.95)
    top_k: int = _doc("Keep only the k most likely tokens (0: no limit).", default=40)
    min_p: float = _doc("Drop tokens less likely than min_p times the top token.", default=0.05)
    repeat_penalty: float = _doc("Penalty for repeating recent tokens (1.0: none).", default=1.1)
    seed: int = _doc("Random seed (-1: a new one each time).", default=-1)
    max_tokens: int = _doc("Most tokens one reply may have; also reserved in the context budget.", default=512)
    tool_roots: list = _doc("Folders the file tools may read (none: no file access).", default_factory=list)
    embedder: str = _doc("Embedding model for new document collections: all-MiniLM-L6-v2 (bundled) or a "
                         "sentence-transformers folder.", default="all-MiniLM-L6-v2")
    embed_backend: str = _doc("What runs the embedding model: auto (openvino on a CPU, falling back to torch-bf16 "
                              "or torch should it fail; torch on CUDA), openvino (compiled for this CPU: about 2.2x "
                              "float32 torch's ingest where the CPU has native bf16, 1.3x elsewhere; vectors within "
                              "cosine 0.9999), torch (float32), torch-bf16 (linear layers in bf16: about 1.6x on "
                              "such a CPU), onnx (ONNX Runtime, float32) or onnx-int8 (int8 weights: faster, "
                              "vectors less exact).", default="auto")
    reranker: str = _doc("Cross-encoder that re-reads the retrieved passages with the question and reorders them: a "
                         "model store name (`crofter models pull cross-encoder/ms-marco-MiniLM-L6-v2`) or a folder "
                         "(empty: none). Compiled by OpenVINO where the embedder is (embed_backend auto or "
                         "openvino, on a CPU): about 2.4x float32 torch's speed.", default="")
    rag_top_k: int = _doc("Passages retrieved per question over documents.", default=5)
    chroma_url: str = _doc("Chroma server (http://HOST:PORT) for document vectors; empty: embedded in the data dir.",
                           default="")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(f, value))
        _check_range("n_ctx", self.n_ctx, 0, 1 << 20)
        _check_range("threads", self.threads, 0, 1024)
        _check_range("gpu_layers", self.gpu_layers, -1, 100_000)
        _check_range("temperature", self.temperature, 0.0, 10.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_range("top_k", self.top_k, 0, 1_000_000)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repeat_penalty", self.repeat_penalty, 0.0, 10.0)
        _check_range("seed", self.seed, -1, 2**32 - 1)
        _check_range("max_tokens", self.max_tokens, 1, 1 << 20)
        from rag.onnx_embed import BACKENDS

        if self.embed_backend not in BACKENDS:
            raise ConfigError(f"embed_backend: {self.embed_backend!r} is not one of {', '.join(BACKENDS)}")
        _check_range("rag_top_k", self.rag_top_k, 1, 100)
        if not self.model:
            raise ConfigError("model: must not be empty")

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in fields(cls)}

    def replace(self, **changes) -> "Settings":
        """A copy with the non-None `changes` applied (and validated)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _check_range(key: str, value, lo, hi) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value!r} is outside {lo}..{hi}")


def _coerce(f: dataclasses.Field, value):
    """Turn TOML or command-line text into the field's type, or name the key."""
    kind = {"str": str, "int": int, "float": float, "list": list}[f.type] if isinstance(f.type, str) else f.type
    try:
        if kind is list:
            if isinstance(value, str):
                value = [v for v in (s.strip() for s in value.split(",")) if v]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or isinstance(value, float):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None


def load(path: Path | None = None) -> Settings:
    """Settings from the TOML file (defaults when it does not exist)."""
    path = path or paths.config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return Settings(**raw)


def save(settings: Settings, path: Path | None = None) -> Path:
    import tomli_w

    path = path or paths.config_path()
    atomic.write_text(path, tomli_w.dumps(dataclasses.asdict(settings)))
    return path


def set_value(key: str, value: str, path: Path | None = None) -> Settings:
    """Validate and persist one setting given as text, e.g. ``set_value("top_k", "20")``."""
    current = load(path)
    if key not in {f.name for f in fields(Settings)}:
        raise ConfigError(f"unknown key {key!r} (known: {', '.join(sorted(Settings.docs()))})")
    updated = dataclasses.replace(current, **{key: value})
    save(updated, path)
    return updated

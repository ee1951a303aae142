"""The registry of models: a name for each GGUF file, HF checkpoint folder or remote server model.

Stored as ``models.json`` in the data dir, rewritten atomically under a file lock.
The bundled SmolLM2 is always listed as ``smollm2-135m`` unless its package is
missing; it cannot be removed.

    >>> reg = Registry()                                  # doctest: +SKIP
    >>> reg.add("~/Downloads/qwen2.5-0.5b-q4_k_m.gguf")   # doctest: +SKIP
    ModelEntry(name='qwen2.5-0.5b-q4_k_m', kind='gguf', ...)
    >>> reg.add_remote("big", "http://gpu-box:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")  # doctest: +SKIP
    ModelEntry(name='big', path='http://gpu-box:8000/v1', kind='remote', ...)
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from . import atomic, paths
from .bundled import BUNDLED_NAME, bundled_gguf
from .gguf_check import check_gguf
from .safetensors_check import SafetensorsError, check_safetensors

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,127}$")
_URL_RE = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ModelError(Exception):
    """A model could not be found, added or removed; the message says why."""


@dataclass
class ModelEntry:
    """One registered model.

    kind: "gguf" (a single file llama.cpp loads), "hf" (a transformers
    checkpoint folder with safetensors weights, for fine-tuning and conversion) or
    "remote" (a model of an OpenAI-compatible server; `path` is its base URL).
    source: "bundled", "local" (added by path), "hub:<repo>" (pulled), "merged" (tune merge),
    "pretrained" (tune pretrain's RUN/model) or "remote".
    probed: fingerprint ("size:mtime_ns") of the file when it last loaded cleanly in a
    test process (app/probe.py); "" when it has not, or not since it changed.
    quarantine: why the file crashed or failed that test load; "" when it did not.
    A quarantined model is refused at load until it is removed or re-added.
    """

    name: str
    path: str
    kind: str
    source: str = "local"
    added: float = 0.0
    probed: str = ""
    quarantine: str = ""
    model: str = ""
    """remote: the server's model id ("": the one model the server offers)."""
    api_key_env: str = ""
    """remote: the environment variable the API key is read from (the key is never stored)."""
    n_ctx: int = 0
    """remote: the server's context window in tokens (0: what the server reports, else 4096)."""

    @classmethod
    def from_record(cls, name: str, rec: dict) -> "ModelEntry":
        """An entry from models.json; fields a newer crofter added are ignored, not fatal."""
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        return cls(name=name, **{k: v for k, v in rec.items() if k in known})

    @property
    def file(self) -> Path:
        return Path(self.path)


def fingerprint(path: Path) -> str:
    """"size:mtime_ns" of `path`: a probe result holds only while this stays the same."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def slug(text: str) -> str:
    """A registry name from a file or repo name: lower case, safe characters."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return s[:128] or "model"


def detect_kind(path: Path) -> str:
    """'gguf' or 'hf', or raise ModelError saying what is wrong with `path`."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            check_gguf(path)
            return "gguf"
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(f"{path}: pickled weights are refused (they can run code); use safetensors or GGUF")
        raise ModelError(f"{path}: not a .gguf file or an HF checkpoint folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: folder has no config.json, so it is not an HF checkpoint")
        if not any(path.glob("*.safetensors")):
            if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
                raise ModelError(f"{path}: only pickled weights (.bin/.pt) found; crofter loads safetensors only")
            raise ModelError(f"{path}: folder has no .safetensors weights")
        for shard in sorted(path.glob("*.safetensors")):
            try:
                check_safetensors(shard)
            except SafetensorsError as exc:
                raise ModelError(str(exc)) from None
        return "hf"
    raise ModelError(f"{path}: no such file or folder")


class Registry:
    """Named local models, persisted in ``<data dir>/models.json``."""

    def __init__(self, root: Path | None = None):
        self.root = root or paths.data_dir()
        self.file = self.root / "models.json"
        self._lock_file = self.root / ".models.lock"

    # -- persistence -------------------------------------------------------
    def _read(self) -> dict:
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{self.file}: unreadable registry ({exc}); move it aside to start afresh") from None
        return raw.get("models", {})

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict]:
        """Read-modify-write under an exclusive lock, committed atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            models = self._read()
            yield models
            atomic.write_text(self.file, json.dumps({"version": 1, "models": models}, indent=2) + "\n")

    # -- queries -----------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        """Every model, the bundled one first."""
        out = []
        bundled = bundled_gguf()
        if bundled is not None:
            # Shipped with crofter and loaded by its own test suite: never probed.
            out.append(ModelEntry(BUNDLED_NAME, str(bundled), "gguf", "bundled", probed=fingerprint(bundled)))
        for name, rec in sorted(self._read().items()):
            out.append(ModelEntry.from_record(name, rec))
        return out

    def get(self, name: str) -> ModelEntry:
        """The entry called `name`; a close-match suggestion when there is none."""
        entries = {e.name: e for e in self.entries()}
        if name in entries:
            return entries[name]
        hint = difflib.get_close_matches(name, list(entries), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else " (see `crofter models list`)"
        raise ModelError(f"no model named {name!r}{extra}")

    def resolve(self, name_or_path: str) -> ModelEntry:
        """A registered name, or a path to a GGUF file / HF folder used as is."""
        try:
            return self.get(name_or_path)
        except ModelError:
            path = Path(name_or_path).expanduser()
            if path.exists():
                return ModelEntry(path.stem, str(path.resolve()), detect_kind(path), "path")
            raise

    def resolve_kind(self, name_or_path: str, kind: str, purpose: str) -> Path:
        """The path of `name_or_path` (a store name or a path), which must be a `kind` model
        ("gguf" or "hf"); `purpose` completes the error, e.g. "training needs an HF checkpoint"."""
        p = Path(name_or_path).expanduser()
        if (kind == "hf" and p.is_dir()) or (kind == "gguf" and p.is_file()):
            return p
        entry = self.resolve(name_or_path)
        if entry.kind != kind:
            raise ModelError(f"{name_or_path}: a {entry.kind.upper()} model; {purpose}")
        return Path(entry.path)

    # -- changes -----------------------------------------------------------
    def add(self, path: str | Path, name: str | None = None, source: str = "local") -> ModelEntry:
        """Register a GGUF file or HF folder (validated first) under `name`."""
        p = Path(path).expanduser().resolve()
        kind = detect_kind(p)
        name = name or slug(p.stem if kind == "gguf" else p.name)
        self._check_name(name)
        entry = ModelEntry(name, str(p), kind, source, time.time())
        with self._editing() as models:
            models[name] = {k: v for k, v in asdict(entry).items() if k != "name"}
        return entry

    def add_remote(self, name: str, base_url: str, model: str = "", api_key_env: str = "", n_ctx: int = 0) -> ModelEntry:
        """Register `model` of the OpenAI-compatible server at `base_url` (e.g. http://host:8000/v1)
        under `name`. Nothing is contacted here (the CLI checks the server first)."""
        entry = self.remote_entry(name, base_url, model, api_key_env, n_ctx)
        with self._editing() as models:
            models[name] = {k: v for k, v in asdict(entry).items() if k != "name"}
        return entry

    @classmethod
    def remote_entry(cls, name: str, base_url: str, model: str = "", api_key_env: str = "", n_ctx: int = 0) -> ModelEntry:
        """The entry `add_remote` would store, validated (ModelError naming the bad field)."""
        url = base_url.strip().rstrip("/")
        if not _URL_RE.match(url):
            raise ModelError(f"--base-url {base_url!r}: not an http(s) URL like http://host:8000/v1")
        if api_key_env and not _ENV_RE.match(api_key_env):
            raise ModelError(f"--api-key-env {api_key_env!r}: not an environment variable name")
        if n_ctx < 0 or n_ctx > 1 << 24:
            raise ModelError(f"--n-ctx {n_ctx}: must be 0 (ask the server) to {1 << 24}")
        cls._check_name(name)
        return ModelEntry(name, url, "remote", "remote", time.time(), model=model, api_key_env=api_key_env, n_ctx=n_ctx)

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.match(name):
            raise ModelError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_', ':' or '-'")
        if name == BUNDLED_NAME:
            raise ModelError(f"{name!r} is the bundled model's name; pick another with --name")

    def remove(self, name: str) -> ModelEntry:
        """Unregister `name`; files that crofter itself downloaded are deleted too."""
        if name == BUNDLED_NAME:
            raise ModelError(f"{name!r} is bundled with crofter and cannot be removed")
        with self._editing() as models:
            if name not in models:
                self.get(name)  # raises with a suggestion
            rec = models.pop(name)
        if rec.get("kind") == "remote":  # a URL: no files of ours
            return ModelEntry.from_record(name, rec)
        owned = paths.models_dir().resolve()
        target = Path(rec["path"]).resolve()
        if owned in target.parents:
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    target.parent.rmdir()  # only succeeds when the repo folder is now empty
        return ModelEntry.from_record(name, rec)

    def record_probe(self, name: str, path: str, fingerprint_: str, failure: str = "") -> bool:
        """Store the outcome of a test load of `name`'s file: passed (`failure` empty,
        the file's fingerprint kept) or quarantined with `failure` as the reason.
        Nothing is stored when `name` is not registered, or now names another file;
        returns whether something was."""
        if name not in self._read():  # an unregistered path: no record to keep (and no write)
            return False
        with self._editing() as models:
            rec = models.get(name)
            if rec is None or rec.get("path") != path:
                return False
            rec["probed"] = "" if failure else fingerprint_
            rec["quarantine"] = failure
        return True

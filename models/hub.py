"""`crofter models pull`: models from the Hugging Face Hub, verified before they land.

    REPO               the repo's GGUF (Q4_K_M when it has several), else its HF checkpoint
    REPO:Q4_K_M        the GGUF file(s) of that quantization (all shards of a split model)
    REPO:FILE.gguf     exactly that file

Only .gguf, .safetensors, .json and tokenizer files are ever fetched: pickled
weights (.bin, .pt, ...) can run code when loaded and are never downloaded.

Transfers go through `huggingface_hub.hf_hub_download` (which resumes a broken
connection with HTTP Range requests) into a staging folder; each file's sha256
(git-LFS files) or git blob sha1 (small files) is then checked against what the
Hub's API lists, and only then is the file moved to its final path. A failed,
interrupted or mismatched pull leaves nothing at the final path and no staging
debris. `HF_ENDPOINT` points it at a mirror (the tests use a loopback server).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import atomic, paths
from .registry import ModelEntry, Registry, slug

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TOKENIZER_FILES = {"tokenizer.model", "merges.txt", "vocab.txt", "vocab.json", "chat_template.jinja", "spiece.model"}
ALLOWED_SUFFIXES = (".gguf", ".safetensors", ".json")
DEFAULT_QUANT = "Q4_K_M"


class HubError(Exception):
    """A pull failed; the message says why and what was left untouched."""


@dataclass
class RemoteFile:
    """One file as the Hub's API lists it."""

    name: str
    size: int | None
    sha256: str | None  # git-LFS files
    blob_sha1: str | None  # small files stored in git directly


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'owner/repo:SEL' -> ('owner/repo', 'SEL'); the selector is optional."""
    repo, _, selector = spec.partition(":")
    if not _REPO_RE.match(repo):
        raise HubError(f"{spec!r}: expected OWNER/REPO, OWNER/REPO:QUANT or OWNER/REPO:FILENAME")
    return repo, selector or None


def allowed(name: str) -> bool:
    """May this repo file be downloaded? (never pickles, never anything unknown)"""
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(ALLOWED_SUFFIXES) or base in TOKENIZER_FILES


def _quant_of(filename: str) -> str:
    """'Qwen2.5-0.5B-Instruct-Q4_K_M-00001-of-00002.gguf' -> 'Q4_K_M' (best effort)."""
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", filename.rsplit("/", 1)[-1][: -len(".gguf")])
    m = re.search(r"(?:^|[-_.])((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)$", stem, re.IGNORECASE)
    return m.group(1).upper() if m else stem


def select(files: list[RemoteFile], selector: str | None) -> tuple[str, list[RemoteFile]]:
    """Which files to fetch: ("gguf", [shards...]) or ("hf", [checkpoint files])."""
    ggufs = [f for f in files if f.name.lower().endswith(".gguf")]
    if selector:
        exact = [f for f in files if selector in (f.name, f.name.rsplit("/", 1)[-1])]
        if exact:
            if not allowed(exact[0].name):
                raise HubError(f"{exact[0].name}: refused; only .gguf, .safetensors, .json and tokenizer files are downloaded (never pickles)")
            return ("gguf" if exact[0].name.lower().endswith(".gguf") else "file"), exact
        chosen = [f for f in ggufs if _quant_of(f.name) == selector.upper()]
        if not chosen:
            quants = sorted({_quant_of(f.name) for f in ggufs})
            hint = f"available: {', '.join(quants)}" if quants else "the repo has no GGUF files"
            raise HubError(f"no file or quantization {selector!r} in this repo ({hint})")
        stems = {re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", f.name) for f in chosen}
        if len(stems) > 1:
            raise HubError(f"{selector!r} matches several models: {', '.join(sorted(stems))}; name the file instead")
        return "gguf", sorted(chosen, key=lambda f: f.name)
    if ggufs:
        quants = {_quant_of(f.name) for f in ggufs}
        if len({re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", f.name) for f in ggufs}) == 1:
            return "gguf", sorted(ggufs, key=lambda f: f.name)
        if DEFAULT_QUANT in quants:
            return select(files, DEFAULT_QUANT)
        raise HubError(f"the repo has several GGUF files; pick one with REPO:QUANT ({', '.join(sorted(quants))})")
    if any(f.name.endswith(".safetensors") for f in files):
        # A checkpoint: top-level weights, configs and tokenizer files only.
        return "hf", [f for f in files if "/" not in f.name and allowed(f.name)]
    raise HubError("the repo has no GGUF or safetensors files (pickled weights are never downloaded)")


def list_files(repo: str, revision: str) -> tuple[str | None, list[RemoteFile]]:
    """(commit sha, files) of `repo` at `revision`, with checksums."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except RepositoryNotFoundError:
        raise HubError(f"{repo}: no such model repo on the Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: no revision {revision!r}") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{repo}: the Hub answered {exc}") from None
    except OSError as exc:
        raise HubError(f"{repo}: cannot reach the Hub ({exc})") from None
    files = [
        RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
        for s in info.siblings or []
    ]
    return info.sha, files


def verify(path: Path, remote: RemoteFile) -> None:
    """Raise HubError unless `path` has exactly the checksum the Hub listed."""
    if remote.sha256:
        h = hashlib.sha256()
        expected, label = remote.sha256, "sha256"
    elif remote.blob_sha1:
        h = hashlib.sha1()  # git's blob id: sha1 of "blob <size>\0" + content
        h.update(b"blob %d\0" % path.stat().st_size)
        expected, label = remote.blob_sha1, "git blob sha1"
    else:
        raise HubError(f"{remote.name}: the Hub listed no checksum, so the download cannot be verified")
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise HubError(f"{remote.name}: {label} mismatch (got {h.hexdigest()[:16]}..., the Hub lists {expected[:16]}...); nothing was saved")


def _download(repo: str, files: list[RemoteFile], commit: str, staging: Path) -> list[Path]:
    from huggingface_hub import hf_hub_download

    out = []
    for f in files:
        try:
            local = Path(hf_hub_download(repo, f.name, revision=commit, local_dir=staging))
        except Exception as exc:  # HTTP status, connection and protocol errors alike (after hf's own retries)
            raise HubError(f"{repo}/{f.name}: download failed ({type(exc).__name__}: {exc}); nothing was saved") from None
        verify(local, f)
        out.append(local)
    return out


def pull(spec: str, revision: str = "main", name: str | None = None, registry: Registry | None = None) -> ModelEntry:
    """Download, verify, move into the store and register; returns the new entry."""
    repo, selector = parse_spec(spec)
    commit, files = list_files(repo, revision)
    kind, chosen = select(files, selector)
    if kind == "file":
        raise HubError(f"{chosen[0].name}: a single non-GGUF file is not a model; pull the repo for its checkpoint")
    registry = registry or Registry()
    store = paths.models_dir()
    dest = store / slug(repo.replace("/", "--"))
    with atomic.staging_dir(store / ".staging", slug(repo.replace("/", "--")) + ".") as staging:
        local = _download(repo, chosen, commit or revision, staging)
        if kind == "gguf":
            dest.mkdir(parents=True, exist_ok=True)
            finals = []
            for src, f in zip(local, chosen):
                final = dest / f.name.rsplit("/", 1)[-1]
                os.replace(src, final)
                finals.append(final)
            atomic.fsync_dir(dest)
            target, default_name = finals[0], slug(finals[0].stem)
        else:
            ckpt = staging / "checkpoint"
            ckpt.mkdir()
            for src, f in zip(local, chosen):
                os.replace(src, ckpt / f.name)
            target = dest
            if dest.exists():
                raise HubError(f"{dest} already exists; remove the old copy with `crofter models rm` first")
            os.replace(ckpt, dest)  # the folder appears complete, in one rename
            atomic.fsync_dir(store)
            default_name = slug(repo.split("/")[1])
        try:
            return registry.add(target, name=name or default_name, source=f"hub:{repo}")
        except Exception:
            # A verified download that is not a usable model (e.g. a malformed GGUF).
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            raise


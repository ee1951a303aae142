"""Preference pairs (prompt, chosen, rejected) for DPO, kept in one append-only JSONL file.

The chat app's compare view adds a pair for each answer the user did not pick. Each
record is one line, written with a single ``os.write`` of the whole line and fsynced
under an exclusive ``fcntl`` lock, so concurrent writers never interleave and a pair
is on disk once `add` returns. A crash can at worst leave the last line torn; the
reader skips it (and says so, with its line number) and keeps every other pair, and
the next `add` starts on a fresh line so it never lands inside the torn one.

`export` writes what `crofter tune dpo --data` reads (finetune.data.load_preferences):

    >>> store = PreferenceStore()                                          # doctest: +SKIP
    >>> store.add("Say hi", "Hello!", "hi", chosen_model="a", rejected_model="b")
    {'prompt': 'Say hi', 'chosen': 'Hello!', 'rejected': 'hi', 'system': '', ...}
    >>> store.export("prefs.jsonl")                                        # doctest: +SKIP
    1
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from models import atomic, paths

FILE_NAME = "preferences.jsonl"
# Fields the DPO loader reads; the rest of a record is metadata it ignores.
DPO_FIELDS = ("prompt", "chosen", "rejected")


class PreferenceError(ValueError):
    """A pair that cannot be stored (the message names the field)."""


class PreferenceStore:
    """Append-only preference pairs in ``<data dir>/preferences.jsonl`` (or `path`)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else paths.data_dir() / FILE_NAME
        self.skipped: list[str] = []  # "file:line: why" for each line the last read left out

    def add(self, prompt: str, chosen: str, rejected: str, *, system: str = "", chosen_model: str,
            rejected_model: str, source: str = "compare") -> dict:
        """Store one pair durably and return the record as stored."""
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                raise PreferenceError(f"{name}: must be non-empty text")
        if chosen == rejected:
            raise PreferenceError("chosen and rejected are identical: nothing to prefer")
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system,
                  "chosen_model": chosen_model, "rejected_model": rejected_model, "source": source,
                  "created": round(time.time(), 3)}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A writer died mid-line: end the torn line so this record stands on its own.
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):  # a full disk: take the partial line back out
                os.ftruncate(fd, size)
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes); disk full?")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        return record

    def all(self) -> list[dict]:
        """Every stored pair, oldest first. Lines that do not parse as a pair (a line torn by
        a crash) are left out and listed in `skipped` as "file:line: why"."""
        self.skipped = []
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            where = f"{self.path.name}:{n}"
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self.skipped.append(f"{where}: torn or unreadable line skipped ({exc})")
                continue
            bad = [k for k in DPO_FIELDS if not isinstance(rec, dict) or not isinstance(rec.get(k), str)]
            if bad:
                self.skipped.append(f"{where}: not a preference pair (no text {bad[0]!r}); skipped")
                continue
            out.append(rec)
        return out

    def export(self, path: str | os.PathLike) -> int:
        """Write every readable pair as JSONL for `crofter tune dpo --data`; returns the count.

        Each line has "prompt" (the user's text; with a system prompt, the two messages
        [system, user] the models answered), "chosen" and "rejected" (text), and the
        metadata fields, which the DPO loader ignores. The file appears at `path` only
        when complete."""
        pairs = self.exportable()
        if not pairs:
            raise PreferenceError(f"{self.path}: no preference pairs to export")
        atomic.write_text(Path(path), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        return len(pairs)

    def exportable(self) -> list[dict]:
        """Every readable pair as the DPO loader reads it (see `export`)."""
        out = []
        for rec in self.all():
            rec = dict(rec)
            if rec.get("system"):
                rec["prompt"] = [{"role": "system", "content": rec["system"]}, {"role": "user", "content": rec["prompt"]}]
            out.append(rec)
        return out

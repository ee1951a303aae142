"""Cheap change detection for `crofter ingest --watch`: a snapshot of (size, mtime) per file.

Polling rather than inotify keeps it working on network and container file systems;
a changed snapshot triggers a normal ingest, whose content hashes decide what is new.
"""
from __future__ import annotations

import os

from .ingest import walk


class Snapshot:
    def __init__(self, paths):
        self.paths = list(paths)
        self.state = self._scan()

    def _scan(self) -> dict[str, tuple[int, int]]:
        files, _, _ = walk(self.paths)
        state = {}
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                continue
            state[str(f)] = (st.st_size, st.st_mtime_ns)
        return state

    def changed(self) -> bool:
        """True when a file appeared, disappeared or changed size or mtime since the snapshot."""
        return self._scan() != self.state


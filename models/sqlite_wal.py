"""WAL mode for the SQLite files several crofter processes may open at once (the
chat history, the evaluation results)."""
from __future__ import annotations

import sqlite3
import time


def set_wal(db: sqlite3.Connection, wait_s: float = 10.0) -> None:
    """PRAGMA journal_mode=WAL, retried: when two processes open one brand-new file at
    once, SQLite refuses the switch with "database is locked" at once, without waiting
    on the busy timeout (17 of 300 racing opens on the CI machine)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)

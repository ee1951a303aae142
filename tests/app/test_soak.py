"""L6: a stateful soak (hypothesis rule-based state machine) over the chat, the history
and documents, with the stores' invariants checked after every step.

The fast tier runs a few short programs; the slow tier (`-m slow`) runs many long ones,
with ingestion into a real collection as one of the steps.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.chat import ChatController
from app.config import Settings
from app.history import HistoryStore
from app.turn import finish

TEXTS = st.sampled_from(["Hi.", "Name a colour.", "[bold]markup[/] stays text", "Two\nlines", "ünïcödé 你好"])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


class Soak(RuleBasedStateMachine):
    engine = None  # the session's engine, set by the test
    documents = False  # ingestion steps (slow tier: the embedder and Chroma are real)

    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path

        # A history of its own per program: hypothesis replays a program's first steps and
        # expects the same rules enabled, so a precondition may not see an earlier program's chats.
        self._home = Path(tempfile.mkdtemp(prefix="soak-history-"))
        self.ctl = ChatController(HistoryStore(self._home / "history.db"), Settings(temperature=0.7, seed=1, max_tokens=4, n_ctx=2048),
                                  loader=lambda entry, s: self.engine)
        self.ctl.load_model("smollm2-135m")
        self.ctl.new_chat()
        self.fds, self.rss = open_fds(), rss_mb()
        self.ingested = 0

    def _send(self, text: str, cancel: threading.Event | None = None):
        return finish(self.ctl.send(text, cancel))

    @rule(text=TEXTS)
    def chat(self, text):
        r = self._send(text)
        assert r.finish_reason in ("stop", "length")

    @rule(text=TEXTS)
    def cancel_a_reply(self, text):
        cancel = threading.Event()
        cancel.set()  # Esc before the first token
        r = self._send(text, cancel)
        assert r.finish_reason == "cancelled"
        assert self.ctl.messages()[-1].status == "incomplete"

    @rule()
    def new_chat(self):
        self.ctl.new_chat()

    @precondition(lambda self: len(self.ctl.store.chats()) > 1)
    @rule(data=st.data())
    def switch_chat(self, data):
        chats = self.ctl.store.chats()
        self.ctl.open_chat(data.draw(st.sampled_from(chats)).id)

    @precondition(lambda self: any(m.role == "assistant" for m in self.ctl.messages()))
    @rule()
    def regenerate(self):
        r = finish(self.ctl.regenerate())
        assert self.ctl.messages()[-1].content == r.answer

    @rule()
    def delete_chat(self):
        self.ctl.store.delete_chat(self.ctl.chat.id)
        chats = self.ctl.store.chats()
        self.ctl.open_chat(chats[0].id) if chats else self.ctl.new_chat()

    @precondition(lambda self: self.documents)
    @rule(n=st.integers(min_value=1, max_value=3))
    def ingest(self, n):
        folder = documents_folder(self.ingested, n)
        self.ingested += n
        done = []
        self.ctl.documents().ingest([folder], "soak", on_done=lambda c, summary, error: done.append((summary, error)))
        deadline = time.monotonic() + 300
        while not done:
            assert time.monotonic() < deadline, "ingest did not finish"
            time.sleep(0.05)
        summary, error = done[0]
        assert error is None, error
        self.ctl.attach_collections(["soak"])

    @invariant()
    def stores_are_sound(self):
        db = sqlite3.connect(self.ctl.store.path)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            # Every stored reply follows a user message; nothing half-written.
            roles = [r for (r,) in db.execute("SELECT role FROM messages WHERE chat_id = ? ORDER BY id", (self.ctl.chat.id,))]
        finally:
            db.close()
        assert all(b != "assistant" or a in ("user", "tool") for a, b in zip(["user"] + roles, roles))

    @invariant()
    def the_session_is_the_stored_chat(self):
        stored = [ChatController.for_model(m) for m in self.ctl.messages()]
        session = [m for m in self.ctl.session.messages if m["role"] != "system"]
        assert session == stored

    @invariant()
    def resources_are_bounded(self):
        assert open_fds() <= self.fds + 32, (open_fds(), self.fds)
        assert rss_mb() <= self.rss + 400, (rss_mb(), self.rss)

    def teardown(self):
        import shutil

        self.ctl.close_documents()
        self.ctl.store.close()
        shutil.rmtree(self._home, ignore_errors=True)


def documents_folder(start: int, n: int) -> str:
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="soak-docs-"))
    for i in range(start, start + n):
        (folder / f"note{i}.md").write_text(f"# Note {i}\n\nThe soak planted fact number {i} here.\n")
    return str(folder)


def run_soak(engine, examples: int, steps: int, documents: bool) -> None:
    Soak.engine = engine
    Soak.documents = documents
    if documents:  # load the embedder once first: a program's RSS bound is not its first load
        warm = Soak()
        warm.ingest(1)
        warm.teardown()
    test = Soak.TestCase
    test.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True,
                             suppress_health_check=list(HealthCheck), database=None)
    test("runTest").runTest()


def test_soak_short_programs(engine):
    run_soak(engine, examples=3, steps=8, documents=False)


@pytest.mark.slow
def test_soak_long_programs_with_documents(engine):
    run_soak(engine, examples=30, steps=40, documents=True)

"""Documents in the chat app: background ingestion from the dialog, grounded answers, sources and passages."""
from __future__ import annotations

import shutil

from app.tui.app import CrofterApp
from app.tui.widgets import status_text
from app.tui.docs import PassageScreen, SourcesPanel
from rag.loaders import extract

from .pilot import SIZE, controller, say, screen_text, start, wait_for

LICENSES = "/usr/share/common-licenses"


def _docs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(f"{LICENSES}/{name}", docs / name)
    return docs


async def test_ingest_in_background_then_answer_over_documents(engine, tmp_path):
    docs = _docs(tmp_path)
    ctl = controller(engine, max_tokens=40)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.screen.query("#paths"))
        app.screen.query_one("#paths").value = str(docs)
        app.screen.query_one("#collection").value = "lic"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "indexing lic" in status_text(app) or app.ingests_done, timeout=60)
        await wait_for(pilot, lambda: app.ingests_done == 1, timeout=240)
        assert ctl.chat.collections == ["lic"]
        assert "docs: lic" in status_text(app) and "indexing" not in status_text(app)
        info = ctl.documents().store.collection("lic")
        assert info.files == 2 and info.chunks > 0

        await say(pilot, "Which license mentions Mozilla?")
        stored = ctl.store.messages(ctl.chat.id)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[0].content == "Which license mentions Mozilla?"  # the question, not the passages
        assert stored[1].prompt_tokens > 300  # ... but the model saw them
        assert isinstance(stored[1].sources, list)
        for s in stored[1].sources:
            assert f"[{s['n']}]" in stored[1].content
        # Later turns carry the question only (what the model wrote back is its own words: not checked).
        asked = [m["content"] for m in ctl.session.messages if m["role"] != "assistant"]
        assert asked and all("<source" not in c for c in asked), asked
        await wait_for(pilot, lambda: app.query(SourcesPanel) or "cites none" in screen_text(app)
                       or "no passage" in screen_text(app), timeout=10)  # the note shows on the next repaint


async def test_sources_panel_opens_the_cited_passage(engine, tmp_path):
    docs = _docs(tmp_path)
    text = extract(docs / "MPL-2.0").text
    start_at = text.index("Mozilla Public License")
    src = {"n": 1, "source": str(docs / "MPL-2.0"), "page": None, "heading": "", "start": start_at,
           "end": start_at + 40, "text": text[start_at:start_at + 40], "score": 0.5}
    ctl = controller(engine)
    chat = ctl.store.new_chat(title="grounded")
    ctl.store.add_message(chat.id, "user", "What is this license?")
    ctl.store.add_message(chat.id, "assistant", "It is the MPL [1].", sources=[src])
    app = CrofterApp(controller=ctl, chat_id=chat.id)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        panel = app.query_one(SourcesPanel)
        await pilot.pause(0.5)
        assert "[1]" in screen_text(app) and "MPL-2.0, chars" in screen_text(app)
        panel.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PassageScreen))
        shown = screen_text(app)
        assert "Mozilla Public License" in shown
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, PassageScreen))
        # A file that changed since it was indexed: the stored text, with a note, never a wrong span.
        (docs / "MPL-2.0").write_text("rewritten")
        panel.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PassageScreen))
        assert "changed since it was ingested" in screen_text(app)

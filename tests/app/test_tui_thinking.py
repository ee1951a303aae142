"""A reasoning model's trace in the chat app (Pilot, real llama.cpp): folded under a header while
and after it streams, Ctrl+B unfolds it, the history keeps it apart, a reopened chat shows it folded.
The model is the bundled GGUF with an R1-style template, its output forced by a grammar."""
from __future__ import annotations

from textual.widgets import Collapsible

from app.tui.app import CrofterApp
from app.tui.widgets import MessageBox
from models.registry import Registry

from .pilot import SIZE, controller, say, screen_text, start, wait_for
from .reasoning import TRACE, forced


async def test_the_trace_is_folded_and_ctrl_b_unfolds_it(r1_gguf, r1_engine):
    Registry().add(r1_gguf, name="smollm2-r1")
    ctl = controller(r1_engine, model="smollm2-r1", n_ctx=1024)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        ctl.session.sampling = forced()
        await say(pilot, "Name a colour.")
        reply = [b for b in app.query(MessageBox) if b.role == "assistant"][-1]
        stored = ctl.messages()[-1]
        assert (reply.content, reply.thinking, reply.message_id) == ("Answer: blue.", TRACE + "\n", stored.id)
        assert (stored.content, stored.thinking) == ("Answer: blue.", TRACE + "\n")
        fold = reply.query_one(".thinking", Collapsible)
        assert fold.collapsed and "Thinking (9 words)" in fold.title
        await wait_for(pilot, lambda: "Answer: blue." in screen_text(app), timeout=10)
        assert TRACE not in screen_text(app)
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: TRACE in screen_text(app), timeout=10)
        assert not fold.collapsed
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: TRACE not in screen_text(app), timeout=10)

        ctl.open_chat(ctl.chat.id)  # reopened from the store
        await app._show_chat()
        reopened = [b for b in app.query(MessageBox) if b.role == "assistant"][-1]
        assert reopened.thinking == TRACE + "\n" and reopened.query_one(".thinking", Collapsible).collapsed

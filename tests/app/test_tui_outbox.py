"""The app keeps what the user typed: messages sent while a model loads wait for it, and a
message sent while a reply streams stays in the input (Pilot, real bundled model)."""
from __future__ import annotations

import threading

from app.chat import ChatController
from app.config import Settings
from app.history import HistoryStore
from app.tui.app import CrofterApp
from app.tui.widgets import status_text

from .pilot import SIZE, boxes, start, wait_for


class Shared:
    """The session's engine as a freshly loaded one: a model switch must not close it."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self):
        pass


async def test_a_message_sent_while_the_model_loads_waits_and_is_sent(engine):
    gate = threading.Event()

    def slow_loader(entry, settings):
        assert gate.wait(60)
        return Shared(engine)

    ctl = ChatController(HistoryStore(), Settings(temperature=0.0, max_tokens=8, n_ctx=2048), loader=slow_loader)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        # Typed and sent at the very first frame, while the model is still loading.
        app.query_one("#prompt").load_text("Hello there")
        await pilot.press("enter")
        assert app.outbox.items == ["Hello there"] and not app.ready
        assert "your message waits; sent when the model is ready" in status_text(app)
        gate.set()
        await wait_for(pilot, lambda: app.replies_done == 1)
        stored = ctl.store.messages(ctl.chat.id)
        assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "complete")]
        assert stored[0].content == "Hello there" and boxes(app)[0] == ("user", "Hello there")
        assert app.outbox.items == [] and "waits" not in status_text(app)

        # After a model switch: two messages wait, and go out in order.
        gate.clear()
        app.switch_model("smollm2-135m")
        for text in ("First after the switch", "Second after the switch"):
            app.query_one("#prompt").load_text(text)
            await pilot.press("enter")
        assert app.outbox.items == ["First after the switch", "Second after the switch"]
        assert "2 messages wait" in status_text(app)
        gate.set()
        await wait_for(pilot, lambda: app.replies_done == 3)
        users = [m.content for m in ctl.store.messages(ctl.chat.id) if m.role == "user"]
        assert users == ["Hello there", "First after the switch", "Second after the switch"]


class Held(Shared):
    """The real engine, with its stream held after the first piece until `release` is set,
    so a test can act while a reply is surely streaming, however fast the machine."""

    def __init__(self, engine):
        super().__init__(engine)
        self.release = threading.Event()

    def stream(self, *args, **kwargs):
        for i, ev in enumerate(self._engine.stream(*args, **kwargs)):
            yield ev
            if i == 0:
                assert self.release.wait(120)


async def test_a_message_sent_while_a_reply_streams_goes_back_to_the_input(engine):
    held = Held(engine)
    ctl = ChatController(HistoryStore(), Settings(temperature=0.0, max_tokens=16, n_ctx=2048),
                         loader=lambda entry, s: held)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        prompt = app.query_one("#prompt")
        prompt.load_text("Write a long story about a dragon.")
        await pilot.press("enter")
        assert app.generating
        prompt.load_text("not yet")
        await pilot.press("enter")
        assert prompt.text == "not yet"  # refused, and still there to send later
        held.release.set()
        await wait_for(pilot, lambda: app.replies_done == 1)
        assert [m.content for m in ctl.store.messages(ctl.chat.id) if m.role == "user"] == [
            "Write a long story about a dragon."]
        assert prompt.text == "not yet"

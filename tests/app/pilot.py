"""Helpers for driving the chat app with Textual's Pilot on the real bundled model."""
from __future__ import annotations

import html
import re
import time

from app.chat import ChatController
from app.config import Settings
from app.history import HistoryStore
from app.tui.widgets import MessageBox, status_text

SIZE = (120, 36)


def controller(engine, **settings):
    """A controller over the shared engine (no second copy of the model in memory)."""
    base = dict(temperature=0.0, max_tokens=48, n_ctx=2048)
    return ChatController(HistoryStore(), Settings(**{**base, **settings}), loader=lambda entry, s: engine)


async def wait_for(pilot, condition, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            app = pilot.app
            raise AssertionError(f"timed out waiting for the app (ready={app.ready}, loading={getattr(app, 'loading', None)}, "
                                 f"generating={app.generating}, replies_done={app.replies_done}, status={status_text(app)!r})")
        await pilot.pause(0.05)


async def start(pilot):
    await wait_for(pilot, lambda: pilot.app.ready)
    await pilot.pause()


async def say(pilot, text):
    app = pilot.app
    prompt = app.query_one("#prompt")
    prompt.focus()
    prompt.load_text(text)
    done = app.replies_done
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.replies_done > done)


def screen_text(app) -> str:
    """What is on screen, as text: the text runs of the SVG screenshot, in order."""
    return html.unescape("".join(re.findall(r">([^<]*)</text>", app.export_screenshot()))).replace("\xa0", " ")


def boxes(app):
    return [(b.role, b.content) for b in app.query(MessageBox)]

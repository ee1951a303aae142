"""SVG snapshots of the main screens (pytest-textual-snapshot).

Regenerate after a deliberate UI change with `pytest tests/app/test_tui_snapshots.py --snapshot-update`
and review the SVGs in tests/app/__snapshots__/.
"""
from __future__ import annotations

from app.tui.app import CrofterApp
from tests.app.pilot import controller, wait_for

SIZE = (110, 32)


def saved_chat_app(engine):
    """A chat with fixed content from the history store: nothing in it depends on timing."""
    ctl = controller(engine)
    older = ctl.store.new_chat(title="Packing list for a hike")
    ctl.store.add_message(older.id, "user", "What should I pack?")
    chat = ctl.store.new_chat(title="Python question")
    ctl.store.add_message(chat.id, "user", "How do I reverse a list in Python?")
    ctl.store.add_message(
        chat.id, "assistant",
        "Use slicing or `reversed`:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])\n```\n\n"
        "**Note:** `list.reverse()` works *in place*.",
        completion_tokens=42, tokens_per_s=100.0,
    )
    return CrofterApp(controller=ctl, chat_id=chat.id)


async def _ready(pilot):
    await wait_for(pilot, lambda: pilot.app.ready)
    await pilot.pause()


def test_main_screen(snap_compare, engine):
    assert snap_compare(saved_chat_app(engine), terminal_size=SIZE, run_before=_ready)


def test_help_screen(snap_compare, engine):
    async def open_help(pilot):
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(saved_chat_app(engine), terminal_size=SIZE, run_before=open_help)

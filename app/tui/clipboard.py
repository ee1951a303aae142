"""F3 / F4: copy the focused (or last) reply, or its last code block, to the clipboard."""
from __future__ import annotations

from ..render import code_blocks
from .widgets import MessageBox


def focused_or_last_reply(app) -> MessageBox | None:
    """The message box with focus, else the last assistant reply that has text."""
    if isinstance(app.focused, MessageBox):
        return app.focused
    replies = [b for b in app.query(MessageBox) if b.role == "assistant" and b.content]
    return replies[-1] if replies else None


def copy_reply(app) -> None:
    box = focused_or_last_reply(app)
    if box is None:
        app.notify("nothing to copy yet", severity="warning")
        return
    app.copy_to_clipboard(box.content)
    app.notify(f"copied {len(box.content)} characters")


def copy_code(app) -> None:
    box = focused_or_last_reply(app)
    blocks = code_blocks(box.content) if box else []
    if not blocks:
        app.notify("no code block in that reply", severity="warning")
        return
    app.copy_to_clipboard(blocks[-1])
    app.notify(f"copied code block ({len(blocks[-1].splitlines())} lines)")

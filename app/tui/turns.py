"""The end of a turn on screen: the stored ids given to its boxes, and the folded reasoning traces."""
from __future__ import annotations

import json
from dataclasses import asdict

from .widgets import MessageBox


async def show_tool_call(app, call) -> None:
    """A finished call of the turn, as a folded box above the streaming reply."""
    box = MessageBox("tool", json.dumps(asdict(call), ensure_ascii=False))
    app._tool_boxes.append(box)
    await app.query_one("#conversation").mount(box, before=app._reply_box)


def attach_ids(app, ids: list[int]) -> None:
    """Give the boxes of the turn the ids the store gave its messages: the reply, its tool
    calls before it, and the user's message (stored again by a regenerate over tools)."""
    boxes = [*app._tool_boxes, app._reply_box]
    stored_user = len(ids) > len(boxes)
    if stored_user:
        users = [b for b in app.query(MessageBox) if b.role == "user"]
        boxes.insert(0, users[-1] if users else None)
    for box, message_id in zip(boxes, ids[-len(boxes):]):
        if box is not None:
            box.message_id = message_id


def toggle_thinking(app) -> None:
    """Show or hide the reasoning trace of the focused reply (else the last one that has one)."""
    replies = [b for b in app.query(MessageBox) if b.role == "assistant" and b.has_thinking]
    target = app.focused if app.focused in replies else (replies[-1] if replies else None)
    if target is None:
        app.notify("no reply here has a reasoning trace", severity="warning")
    else:
        target.toggle_thinking()

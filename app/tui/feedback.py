"""Marks on replies from the chat app: thumbs up/down, "preferred", and browsing the versions
a regenerate kept. The keys are a focused reply's (MessageBox); what they mean is here and in
ChatController; the marks become preference data with `crofter chats export --prefs/--marks`."""
from __future__ import annotations

from ..render import display_safe

# (key, action, what it does): a focused reply's own keys, also listed in the help screen.
REPLY_KEYS = [("plus", "mark_up", "Reply: thumbs up (again: clear)"),
              ("minus", "mark_down", "Reply: thumbs down (again: clear)"),
              ("p", "prefer", "Reply: preferred over its other versions (for DPO pairs)"),
              ("left", "browse(-1)", "Last reply: previous version (after Ctrl+R)"),
              ("right", "browse(1)", "Last reply: next version")]


def describe(message, versions: int = 0) -> str:
    """The note a reply's marks add to its header."""
    parts = []
    if message.mark:
        parts.append("marked good" if message.mark > 0 else "marked bad")
    if message.preferred:
        parts.append("preferred")
    if versions > 1:
        parts.append(f"{versions} versions (←/→)")
    return " · ".join(parts)


def versions(ctl, message_id: int) -> int:
    """How many versions the reply `message_id` has (0: it is not the last reply)."""
    reply, alts = ctl.alternatives()
    return 1 + len(alts) if reply is not None and reply.id == message_id else 0


def apply(app, box, action: str, step: int = 0) -> None:
    """Do `action` for the reply `box` shows (called from its key bindings)."""
    ctl = app.controller
    if app.generating or box.message_id is None:
        app.notify("wait for the reply to finish", severity="warning")
        return
    try:
        if action == "browse":
            if not versions(ctl, box.message_id):
                raise ValueError("only the last reply has versions to browse")
            message, _ = ctl.browse_reply(step)
            box.content, box.thinking = message.content, message.thinking or ""
            box.body.finish(display_safe(message.content))
        else:
            current = ctl.store.message(box.message_id)
            if action == "prefer":
                message = ctl.mark_reply(box.message_id, current.mark, preferred=not current.preferred)
            else:
                wanted = 1 if action == "mark_up" else -1
                message = ctl.mark_reply(box.message_id, None if current.mark == wanted else wanted, bool(current.preferred))
    except ValueError as exc:
        app.notify(str(exc), severity="warning")
        return
    box.set_mark_note(describe(message, versions(ctl, message.id)))

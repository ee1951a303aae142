"""Tools in the chat app: turning them on and off, and asking the user about a call.

The turn itself is the same as every other (turn.run_turn, streamed, each finished call
shown as it happens); a call that needs the user's consent blocks the generation thread
until the approval dialog is answered (or the turn is stopped with Esc, which counts as "no").
"""
from __future__ import annotations

import threading

from .screens import ApproveCall


def approve_on_screen(app, tool, arguments: dict, tainted: bool) -> str:
    """Show the request and wait for "yes", "chat" or "no" (called off the UI thread)."""
    answer: list[str] = []
    decided = threading.Event()

    def show() -> None:
        def done(choice: str | None) -> None:
            answer.append(choice or "no")
            decided.set()

        app.push_screen(ApproveCall(tool.name, tool.description, arguments, tainted), done)

    app.call_from_thread(show)
    while not decided.wait(0.1):
        if app._cancel.is_set():
            return "no"
    return answer[0]


def toggle_tools(app) -> None:
    """Ctrl+L: tools on or off for the next turns (problems loading a tool are shown, not fatal)."""
    ctl = app.controller
    ctl.tools_enabled = not ctl.tools_enabled
    if ctl.tools_enabled:
        reg = ctl.tool_registry()
        for problem in reg.problems:
            app.notify(problem, title="Tool not loaded", severity="warning")
        app.notify(f"tools on: {', '.join(reg.tools)}")
    else:
        app.notify("tools off")
    app.update_status()

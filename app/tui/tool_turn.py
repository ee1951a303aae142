"""A chat turn with tools on, run from the app's generation thread.

The tool loop is not streamed: it runs to the end in the worker, each finished
call is posted to the screen as it happens, and a call that needs the user's
consent blocks the worker until the approval dialog is answered (or the turn is
stopped with Esc, which counts as "no").
"""
from __future__ import annotations

import threading
from dataclasses import replace

from .messages import ToolCallDone
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


def tool_turn(app, text: str):
    """A `start(cancel)` for the app's generation worker: the loop as one event stream."""

    def start(cancel):
        from ..engine import Event  # here, not at import: gguf's import would delay the first frame

        ctl = app.controller
        turn = ctl.send_with_tools(
            text,
            lambda tool, args, tainted: approve_on_screen(app, tool, args, tainted),
            lambda call: app.post_message(ToolCallDone(call)),
        )
        yield Event(text=turn.answer)
        yield Event(done=replace(ctl.session.last_result, text=turn.answer, finish_reason=turn.finish_reason))

    return start


def toggle_tools(app) -> None:
    """Ctrl+L: tools on or off for the next turns (problems loading a tool are shown, not fatal)."""
    ctl = app.controller
    ctl.tools_enabled = not ctl.tools_enabled
    if ctl.tools_enabled:
        reg = ctl.tool_registry()
        for problem in reg.problems:
            app.notify(problem, title="Tool not loaded", severity="warning")
        app.notify(f"tools on: {', '.join(reg.tools)} (replies are not streamed while tools are on)")
    else:
        app.notify("tools off")
    app.update_status()

"""The app's keys as the user finds them: the help table and the command palette, both
built from the app's own bindings, so neither can drift from what the keys do."""
from __future__ import annotations

from typing import Iterator

from textual.app import SystemCommand

# Keys the prompt input handles itself (widgets.PromptInput), not bindings of the app.
INPUT_KEYS = [("enter", "Send the message"), ("ctrl+j / alt+enter", "New line in the message"),
              ("up / down", "Recall sent messages"), ("ctrl+p", "Command palette")]


def help_rows(bindings) -> list[tuple[str, str]]:
    """(key, what it does) for every binding, then the input's own keys and a focused reply's."""
    from .feedback import REPLY_KEYS

    return ([(b.key.replace(",", " / "), b.description) for b in bindings] + INPUT_KEYS
            + [(key, text) for key, _, text in REPLY_KEYS])


def palette_commands(app) -> Iterator[SystemCommand]:
    """A command palette entry for each binding of `app` but quit and stop."""
    for b in app.BINDINGS:
        if b.action not in ("quit", "stop"):
            yield SystemCommand(b.description, f"{b.description} ({b.key})", lambda a=b.action: app.run_action(a))

"""Messages the user sent while a model was loading: kept in order, sent once it is ready.

Nothing typed is lost: what waits is shown in the status bar, goes out one message per
reply when the model is ready, and goes back into the input if no model comes.

    >>> box = Outbox(); box.add("hi"); box.add("and then"); box.describe()
    '2 messages wait; sent when the model is ready'
    >>> box.take(), box.give_back("draft")
    ('hi', 'and then\\n\\ndraft')
"""
from __future__ import annotations


class Outbox:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)

    def describe(self) -> str:
        n = len(self.items)
        return ("your message waits" if n == 1 else f"{n} messages wait") + "; sent when the model is ready"

    def take(self) -> str | None:
        """The next message to send, or None."""
        return self.items.pop(0) if self.items else None

    def give_back(self, draft: str = "") -> str:
        """Everything that waited (and the input's current draft after it), as the input's new text."""
        text = "\n\n".join([*self.items, draft] if draft.strip() else self.items)
        self.items.clear()
        return text

"""Widgets of the chat screen: they compose, render and route; the logic is in app.chat.

Untrusted text reaches the screen only as `rich.text.Text` (never parsed as
markup) or as Markdown source, after `display_safe` has neutralised control
characters.
"""
from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Input, Label, ListItem, ListView, Static, TextArea

from ..render import display_safe
from .feedback import REPLY_KEYS
from .reply import ReplyView


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Alt+Enter) adds a line, Up/Down recall history."""

    BINDINGS = [Binding("ctrl+j,alt+enter,shift+enter", "newline", "New line", show=False)]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            self.text = text
            super().__init__()

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         placeholder="Message  (Enter sends · Ctrl+J new line · Up recalls · F1 help)", **kwargs)
        self.sent: list[str] = []
        self._recall: int | None = None

    def action_newline(self) -> None:
        self.insert("\n")

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text.strip()
            if text:
                self.sent.append(text)
                self._recall = None
                self.clear()
                self.post_message(self.Submitted(text))
            return
        if event.key in ("up", "down") and self.sent and (not self.text or self._recall is not None):
            # Recall only from an empty box or while already browsing history.
            row = self.cursor_location[0]
            if (event.key == "up" and row == 0) or (event.key == "down" and row == self.document.line_count - 1):
                event.stop()
                event.prevent_default()
                step = -1 if event.key == "up" else 1
                i = (len(self.sent) if self._recall is None else self._recall) + step
                if i >= len(self.sent):
                    self._recall = None
                    self.clear()
                else:
                    self._recall = max(0, i)
                    self.load_text(self.sent[self._recall])
                return
        await super()._on_key(event)


class MessageBox(Vertical, can_focus=True):
    """One message: a role header and its body (Markdown for replies, literal text for users).
    A focused reply takes marks (see tui/feedback.py)."""

    BINDINGS = [Binding(key, action, text, show=False) for key, action, text in REPLY_KEYS]

    def __init__(self, role: str, content: str, message_id: int | None = None, note: str = "",
                 streaming: bool = False, thinking: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.message_id = message_id
        self.note = note
        self.streaming = streaming
        self.thinking = thinking  # the reply's reasoning trace, folded above it (Ctrl+B)
        self.marks = ""  # the user's marks on a reply, shown in its header

    def _head(self) -> Text:
        head = Text(self.role.capitalize(), style="bold")
        if self.note:
            head.append(" · " + self.note, style="dim")
        if self.marks:
            head.append(" · " + self.marks, style="bold")
        return head

    def set_mark_note(self, marks: str) -> None:
        self.marks = marks
        self.query_one(".role", Label).update(self._head())

    def _reply_action(self, action: str, step: int = 0) -> None:
        if self.role == "assistant":
            from .feedback import apply

            apply(self.app, self, action, step)

    def action_mark_up(self) -> None:
        self._reply_action("mark_up")

    def action_mark_down(self) -> None:
        self._reply_action("mark_down")

    def action_prefer(self) -> None:
        self._reply_action("prefer")

    def action_browse(self, step: int) -> None:
        self._reply_action("browse", step)

    def compose(self) -> ComposeResult:
        yield Label(self._head(), classes="role")
        if self.role == "tool":
            yield from self._tool_body()
        elif self.role == "assistant":
            if self.thinking:
                yield self._thinking_fold(display_safe(self.thinking))
            yield ReplyView(display_safe(self.content), streaming=self.streaming, classes="body")
        else:
            yield Static(Text(display_safe(self.content)), classes="body")

    def _tool_body(self) -> ComposeResult:
        """A tool call, collapsed to one line: name and status; expanded: arguments and result."""
        import json

        try:
            call = json.loads(self.content)
            title = f"{call['name']} → {call['status']}"
            detail = f"arguments: {json.dumps(call['arguments'], ensure_ascii=False, indent=2)}\n\nresult:\n{call['result']}"
        except (ValueError, KeyError, TypeError):
            title, detail = "tool call", self.content
        with Collapsible(title=display_safe(title), collapsed=True, classes="body"):
            yield Static(Text(display_safe(detail)))

    @staticmethod
    def _thinking_fold(text: str) -> Collapsible:
        return Collapsible(Static(Text(text), classes="thinking-text"), title=f"Thinking ({len(text.split())} words)",
                           collapsed=True, classes="thinking")

    @property
    def has_thinking(self) -> bool:
        return bool(self.thinking)

    async def add_thinking(self, text: str) -> None:
        """More of the trace while it streams (the fold appears with its first piece)."""
        self.thinking += text
        folds = self.query(".thinking")
        if not folds:
            await self.mount(self._thinking_fold(self.thinking), before=self.body)
            return
        folds.first(Collapsible).title = f"Thinking… ({len(self.thinking.split())} words)"
        self.query_one(".thinking-text", Static).update(Text(self.thinking))

    def end_thinking(self, text: str) -> None:
        """The turn's final trace (what the history stores)."""
        self.thinking = text
        if text and self.query(".thinking"):
            self.query_one(".thinking", Collapsible).title = f"Thinking ({len(text.split())} words)"
            self.query_one(".thinking-text", Static).update(Text(text))

    def toggle_thinking(self) -> None:
        fold = self.query_one(".thinking", Collapsible)
        fold.collapsed = not fold.collapsed

    @property
    def body(self) -> ReplyView | Static:
        return self.query_one(".body")

    def set_note(self, note: str) -> None:
        self.note = note
        self.query_one(".role", Label).update(self._head())


class ChatItem(ListItem):
    """A chat in the sidebar; the title is shown literally."""

    def __init__(self, chat_id: int, title: str) -> None:
        super().__init__(Label(Text(display_safe(title), no_wrap=True, overflow="ellipsis")))
        self.chat_id = chat_id


class ChatSidebar(Vertical):
    """A search box over the list of chats; routes the user's choices up as messages."""

    class Chosen(Message):
        def __init__(self, chat_id: int) -> None:
            self.chat_id = chat_id
            super().__init__()

    class Searched(Message):
        def __init__(self, text: str) -> None:
            self.text = text
            super().__init__()

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search chats…", id="search")
        yield ListView(id="chats")

    def show(self, chats: list, current_id: int | None) -> None:
        """List `chats` (objects with .id and .title), highlighting the open one."""
        lv = self.query_one(ListView)
        lv.clear()
        lv.extend(ChatItem(c.id, c.title) for c in chats)
        for i, c in enumerate(chats):
            if c.id == current_id:
                lv.index = i

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ChatItem):
            self.post_message(self.Chosen(event.item.chat_id))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.Searched(event.value.strip()))


class StatusBar(Static):
    """Model, speed and the context meter, as plain text."""

    def show(self, model: str, speed: str, meter: str) -> None:
        self.update(Text("  ·  ".join(x for x in (model, speed, meter) if x)))


def status_text(app) -> str:
    """The status bar's plain text (for tests and benchmarks)."""
    content = app.query_one(StatusBar).render()
    return content.plain if isinstance(content, Text) else str(content)

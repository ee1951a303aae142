"""Modal screens: help, model picker, one-line/multi-line text prompts, sampling settings."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, OptionList, TextArea
from textual.widgets.option_list import Option


class HelpScreen(ModalScreen[None]):
    """Every key binding of the app, from the bindings themselves."""

    BINDINGS = [Binding("escape,q,f1", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = bindings

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Keys  (Esc to close)", classes="title")
            table = DataTable(show_cursor=False)
            table.add_columns("Key", "Action")
            for key, text in self.rows:
                table.add_row(Text(key), Text(text))
            yield table


class ModelPicker(ModalScreen[str | None]):
    """Pick a registered GGUF model; returns its name."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, names: list[tuple[str, str]], current: str | None) -> None:
        super().__init__()
        self.names = names
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Model  (Enter to load, Esc to cancel)", classes="title")
            options = [Option(Text(f"{'● ' if n == self.current else '  '}{n}  {desc}"), id=n) for n, desc in self.names]
            yield OptionList(*options, id="models")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class TextPrompt(ModalScreen[str | None]):
    """Ask for a line (or, multiline=True, a block) of text; returns it or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, title: str, value: str = "", multiline: bool = False) -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.multiline = multiline

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            hint = "Ctrl+S to save, Esc to cancel" if self.multiline else "Enter to save, Esc to cancel"
            yield Label(Text(f"{self.title_text}  ({hint})"), classes="title")
            if self.multiline:
                yield TextArea(self.value, id="value", soft_wrap=True)
            else:
                yield Input(self.value, id="value")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_save(self) -> None:
        widget = self.query_one("#value")
        self.dismiss(widget.text if isinstance(widget, TextArea) else widget.value)


class SettingsScreen(ModalScreen[dict | None]):
    """Edit the sampling settings of the session; returns the changed values as text."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]
    FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens")

    def __init__(self, values: dict) -> None:
        super().__init__()
        self.values = values

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Sampling  (Ctrl+S or Save to apply, Esc to cancel)", classes="title")
            with Grid(id="settings-grid"):
                for name in self.FIELDS:
                    yield Label(name)
                    yield Input(str(self.values[name]), id=f"set-{name}")
            yield Button("Save", id="save", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        self.dismiss({name: self.query_one(f"#set-{name}", Input).value for name in self.FIELDS})


class ApproveCall(ModalScreen[str]):
    """Show a requested tool call with its full arguments; returns "yes", "chat" or "no"."""

    BINDINGS = [Binding("escape,n", "dismiss('no')", "No"), Binding("y", "dismiss('yes')", "Yes"),
                Binding("a", "dismiss('chat')", "Yes for this chat")]

    def __init__(self, tool_name: str, description: str, arguments: dict, tainted: bool) -> None:
        super().__init__()
        self.tool_name, self.description, self.arguments, self.tainted = tool_name, description, arguments, tainted

    def compose(self) -> ComposeResult:
        import json

        with Vertical(id="dialog"):
            yield Label(Text(f"Run tool {self.tool_name}?"), classes="title")
            yield Label(Text(self.description))
            if self.tainted:
                yield Label(Text("This turn has read documents or tool output: the request may come from them."), classes="warn")
            yield TextArea(json.dumps(self.arguments, indent=2, ensure_ascii=False), read_only=True, id="args")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="primary")
                yield Button("Yes for this chat (a)", id="chat")
                yield Button("No (n)", id="no", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

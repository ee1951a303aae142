"""Documents in the chat app: the collections dialog, sources under answers, the passage viewer.

Ingestion runs on its own thread (documents.DocsService); progress reaches the
status bar through `call_from_thread`. Every file name and passage is shown as
plain `Text`, never as markup.
"""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ListItem, ListView, SelectionList, Static

from ..render import display_safe
from .feedback import describe
from .widgets import MessageBox


class DocumentsScreen(ModalScreen[dict | None]):
    """Attach collections to the chat, or add files and folders to a collection.

    Returns {"attach": [names]} or {"ingest": ([paths], collection)}, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, collections: list[tuple[str, str]], attached: list[str]) -> None:
        super().__init__()
        self.collections = collections  # (name, description)
        self.attached = attached

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Documents  (Space toggles, Esc closes)", classes="title")
            if self.collections:
                yield Label("Answer this chat from:")
                yield SelectionList[str](
                    *[(Text(f"{name}  {desc}"), name, name in self.attached) for name, desc in self.collections],
                    id="collections")
                yield Button("Attach selected", id="attach", variant="primary")
            else:
                yield Label("No collections yet: add files below.")
            yield Label("Add files or folders (separate several with ';'):")
            yield Input(placeholder="~/notes; ~/papers/report.pdf", id="paths")
            yield Input(self.attached[0] if self.attached else "default", placeholder="collection name", id="collection")
            yield Button("Add and index in the background", id="ingest")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "attach":
            self.dismiss({"attach": list(self.query_one("#collections", SelectionList).selected)})
        elif event.button.id == "ingest":
            self._ingest()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._ingest()

    def _ingest(self) -> None:
        import os

        paths = [os.path.expanduser(p.strip()) for p in self.query_one("#paths", Input).value.split(";") if p.strip()]
        name = self.query_one("#collection", Input).value.strip()
        if not paths or not name:
            self.app.notify("name at least one path and a collection", severity="warning")
            return
        self.dismiss({"ingest": (paths, name)})


class SourcesPanel(ListView):
    """The sources an answer cites; Enter opens the passage."""

    def __init__(self, sources: list[dict], incomplete: str = "") -> None:
        items = [ListItem(Label(Text(display_safe(_label(s)))), name=str(i)) for i, s in enumerate(sources)]
        super().__init__(*items, classes="sources")
        self.sources = sources
        self.border_title = "Sources" + (f" (index still incomplete: {incomplete})" if incomplete else "")

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        self.app.push_screen(PassageScreen(self.sources[int(event.item.name)]))


def _label(s: dict, full: bool = False) -> str:
    """"[2] report.pdf p. 3 > Results, chars 120-860  (~/papers)": the file name first, so a
    narrow panel still shows what matters; the passage viewer shows the full path."""
    import os

    path = s["source"]
    name = path if full else os.path.basename(path)
    where = name + (f" p. {s['page']}" if s.get("page") else "") + (f" > {s['heading']}" if s.get("heading") else "")
    folder = "" if full else f"  ({os.path.dirname(path).replace(os.path.expanduser('~'), '~', 1)})"
    return f"[{s['n']}] {where}, chars {s['start']}-{s['end']}{folder}"


class PassageScreen(ModalScreen[None]):
    """A cited passage in its file, highlighted, with the text around it."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, source: dict) -> None:
        super().__init__()
        self.source = source

    def compose(self) -> ComposeResult:
        from ..documents import read_passage

        before, passage, after = read_passage(self.source)
        body = Text()
        body.append(display_safe(before), style="dim")
        body.append(display_safe(passage), style="reverse")
        body.append(display_safe(after), style="dim")
        with Vertical(id="dialog", classes="passage"):
            yield Label(Text(display_safe(_label(self.source, full=True)) + "  (Esc to close)"), classes="title")
            with VerticalScroll():
                yield Static(body, id="passage")
            with Horizontal():
                yield Button("Close", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)


def open_documents(app) -> None:
    """F5: the documents dialog, then attach or start an ingestion."""
    ctl = app.controller
    try:
        cols = [(c.name, f"{c.files} files, {c.chunks} chunks") for c in ctl.documents().collections()]
    except Exception as exc:  # e.g. another crofter process owns the store
        app.notify(str(exc), title="Documents unavailable", severity="error", timeout=10)
        return

    def chosen(result: dict | None) -> None:
        if not result:
            return
        try:
            if "attach" in result:
                ctl.attach_collections(result["attach"])
                names = ", ".join(result["attach"]) or "none"
                app.notify(f"answering from: {names}")
            else:
                paths, name = result["ingest"]
                start_ingest(app, paths, name)
        except Exception as exc:
            app.notify(str(exc), title="Documents", severity="error", timeout=10)
        app.update_status()

    app.push_screen(DocumentsScreen(cols, list(ctl.chat.collections)), chosen)


def start_ingest(app, paths: list[str], name: str) -> None:
    ctl = app.controller

    def progress(collection, p) -> None:
        app.call_from_thread(app.update_status)

    def done(collection, summary, error) -> None:
        def show() -> None:
            if error:
                app.notify(error, title=f"Indexing {collection} failed", severity="error", timeout=15)
            else:
                failed = f", {len(summary.failed)} failed" if summary.failed else ""
                app.notify(f"{collection}: {len(summary.ingested)} files indexed ({summary.chunks} chunks), "
                           f"{len(summary.unchanged)} unchanged{failed}", title="Documents")
                for path, reason in summary.failed[:5]:
                    app.notify(display_safe(f"{path}: {reason}"), title="Not indexed", severity="warning")
            app.ingests_done += 1
            app.update_status()

        app.call_from_thread(show)

    ctl.documents().ingest(paths, name, progress, done)
    if name not in ctl.chat.collections:
        ctl.attach_collections([*ctl.chat.collections, name])
    app.notify(f"indexing into {name} in the background; this chat answers from it")


def warn_if_index_incomplete(app) -> None:
    """Before a question: say so when an attached collection is still being indexed."""
    ctl = app.controller
    if ctl.chat is not None and ctl.chat.collections and ctl.docs_open is not None:
        pending = ctl.docs_open.incomplete(ctl.chat.collections)
        if pending:
            app.notify(f"the index is still incomplete: {', '.join(pending)}; the answer may miss documents",
                       severity="warning")


async def show_sources(app, done) -> None:
    """Under a reply over documents: the cited sources (Enter opens one), or a note why there are none."""
    ctl, box = app.controller, app._reply_box
    g = done
    if g is None or not g.grounded or box is None:
        return
    if not g.sources:
        box.set_note(box.note + " · no passage matched")
    elif not g.cited:
        box.set_note(box.note + f" · cites none of {len(g.sources)} retrieved passages")
    else:
        pending = ", ".join(ctl.docs_open.incomplete(ctl.chat.collections)) if ctl.docs_open else ""
        await app.query_one("#conversation").mount(SourcesPanel([s.as_dict() for s in g.cited], pending), after=box)


def docs_status(ctl) -> str:
    """The status bar's documents part: attached collections and any indexing in progress."""
    if ctl.docs_open is None and not (ctl.chat and ctl.chat.collections):
        return ""
    parts = []
    if ctl.chat and ctl.chat.collections:
        parts.append("docs: " + ", ".join(ctl.chat.collections))
    if ctl.docs_open is not None:
        for name, p in list(ctl.docs_open.ingesting.items()):
            parts.append(f"indexing {name} {p.files_done}/{p.files_total} files, {p.chunks} chunks")
    return " · ".join(parts)


def chat_boxes(messages) -> list:
    """The widgets that show a stored chat: a box per message, a sources panel under each
    grounded answer, and the note of what each reply cost."""
    boxes = []
    for m in messages:
        note = "stopped" if m.status == "incomplete" else ""
        if m.role == "assistant" and m.tokens_per_s:
            note = (note + " · " if note else "") + f"{m.completion_tokens} tokens, {m.tokens_per_s:.1f} tok/s"
        box = MessageBox(m.role, m.content, m.id, note, thinking=m.thinking or "")
        box.marks = describe(m)
        boxes.append(box)
        if m.sources:
            boxes.append(SourcesPanel(m.sources))
    return boxes

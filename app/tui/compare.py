"""The compare view: one prompt, several models side by side, the better answer picked.

Choose the models (the chat's own is preselected) and the prompt (the chat's draft, if
any), then F9: the answers stream in one column per model, one model after the other on a
CPU, side by side when at most one of them needs the CPU (app.compare.Comparison loads,
answers and closes each). Keys 1..N (or a
column's Pick button) choose the better answer; each other answer is stored with it as
a preference pair for DPO (app.preferences). T stores nothing (a tie, or both bad).
Esc closes the view and cancels what runs.
"""
from __future__ import annotations

import threading
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Label, SelectionList, TextArea

from ..compare import Answer, Comparison, Step, running
from ..preferences import PreferenceStore
from ..render import display_safe
from .messages import Pacer
from .reply import ReplyView


class Stepped(Message):
    """Progress of the comparison (text of one step, or several coalesced)."""

    def __init__(self, step: Step) -> None:
        self.step = step
        super().__init__()


class Ended(Message):
    """The comparison's worker ended (every model answered, or it was stopped; `error` if it failed)."""

    def __init__(self, error: str = "") -> None:
        self.error = error
        super().__init__()


class AnswerColumn(Vertical):
    """One model's answer: its name and speed, the streamed reply, a Pick button."""

    def __init__(self, index: int, model: str) -> None:
        super().__init__(classes="compare-column", id=f"column-{index + 1}")
        self.index = index
        self.model = model

    def compose(self) -> ComposeResult:
        yield Label(Text(f"{self.index + 1}. {display_safe(self.model)}", style="bold"), classes="compare-name")
        yield Label(Text("waiting", style="dim"), classes="compare-note")
        with VerticalScroll(classes="compare-body"):
            yield ReplyView("", streaming=True)
        yield Button(f"Pick ({self.index + 1})", id=f"pick-{self.index + 1}", disabled=True)

    @property
    def reply(self) -> ReplyView:
        return self.query_one(ReplyView)

    def note(self, text: str) -> None:
        self.query_one(".compare-note", Label).update(Text(display_safe(text), style="dim"))


class CompareScreen(ModalScreen[None]):
    """Set up and run a comparison, then store the user's pick."""

    DEFAULT_CSS = """
    #compare { width: 96%; height: 92%; border: thick $primary; background: $surface; padding: 0 1; }
    #compare .title { text-style: bold; }
    #compare-setup { height: 1fr; }
    #compare-models { width: 40; height: 1fr; }
    #compare-prompt { width: 1fr; height: 1fr; }
    #compare-columns { height: 1fr; display: none; }
    .compare-column { width: 1fr; height: 1fr; border: round $primary-background; padding: 0 1; }
    .compare-column.chosen { border: round $success; }
    .compare-body { height: 1fr; }
    #compare-result, #compare-info { width: 1fr; height: auto; }
    """
    AUTO_FOCUS = "#compare-prompt"
    BINDINGS = [Binding("f9,ctrl+s", "run", "Compare"), Binding("t", "tie", "Tie / both bad")] + [
        Binding(str(n), f"pick({n})", f"Pick {n}", show=False) for n in range(1, 10)]

    def __init__(self, models: list, selected: list[str], prompt: str, settings, *, loader,
                 system: str = "", current=None, store: PreferenceStore | None = None) -> None:
        """models: the ModelEntry list to choose from; current: (name, engine) of the chat's
        model, which answers on that engine; loader(entry, settings) -> Engine for the rest."""
        super().__init__()
        self.entries = {e.name: e for e in models}
        self.selected, self.draft = selected, prompt
        self.settings, self.loader, self.system, self.current = settings, loader, system, current
        self.store = store or PreferenceStore()
        self.comparison: Comparison | None = None
        self.phase = "setup"  # -> "running" -> "picking" -> "done"
        self.stored: list[dict] = []  # the pairs stored by the pick
        self.finished = threading.Event()  # the worker is done (a stopped run included)
        self.pacer = Pacer()

    def compose(self) -> ComposeResult:
        with Vertical(id="compare"):
            yield Label("Compare models  (F9 runs · 1-9 or Pick chooses · T: tie / both bad · Esc closes)",
                        classes="title")
            with Horizontal(id="compare-setup"):
                models = SelectionList(*[(Text(n), n, n in self.selected) for n in self.entries], id="compare-models")
                models.border_title = "Models (space toggles)"
                yield models
                prompt = TextArea(self.draft, id="compare-prompt", soft_wrap=True)
                prompt.border_title = "Prompt"
                yield prompt
            yield Label("", id="compare-info")
            yield Horizontal(id="compare-columns")
            yield Label("", id="compare-result")

    # -- running -------------------------------------------------------------
    async def action_run(self) -> None:
        if self.phase != "setup":
            return
        chosen = set(self.query_one("#compare-models", SelectionList).selected)
        names = [n for n in self.entries if n in chosen]  # in the list's order
        prompt = self.query_one("#compare-prompt", TextArea).text.strip()
        if len(names) < 2:
            self.notify("choose at least two models (space toggles one)", severity="warning")
            return
        if not prompt:
            self.notify("type a prompt to compare on", severity="warning")
            return
        if running():
            self.notify("the last comparison is still closing its model; try again in a moment", severity="warning")
            return
        self.comparison = Comparison(prompt, [self.entries[n] for n in names], self.settings, loader=self.loader,
                                     system=self.system, current=self.current)
        self.phase = "running"
        self.query_one("#compare-setup").display = False
        columns = self.query_one("#compare-columns")
        columns.display = True
        await columns.mount_all([AnswerColumn(i, n) for i, n in enumerate(names)])
        s = self.comparison.sampling
        self.query_one("#compare-info", Label).update(Text(
            f"Prompt: {display_safe(prompt)}\nseed {s.seed} · temperature {s.temperature} · max {s.max_tokens} tokens"
            + (" · side by side" if self.comparison.together else " · one after the other")
            + (" · system prompt of the chat" if self.system else ""), no_wrap=True, overflow="ellipsis"))
        self.set_focus(None)  # digits pick from here on, not type
        self._work(self.comparison)

    @work(thread=True, exclusive=True, group="compare")
    def _work(self, comparison: Comparison) -> None:
        """Run the comparison; each model's text is coalesced to one message per pacer interval
        (side by side, the models' pieces interleave: each keeps its own pending text)."""
        pending: dict[int, list[str]] = {}
        last = 0.0

        def flush() -> None:
            nonlocal last
            for index, parts in pending.items():
                if parts:
                    self.post_message(Stepped(Step(index, "text", "".join(parts))))
            pending.clear()
            last = time.monotonic()

        error = ""
        try:
            for step in comparison.run():
                if step.stage == "text":
                    pending.setdefault(step.index, []).append(step.text)
                    if time.monotonic() - last >= self.pacer.interval:
                        flush()
                    continue
                flush()
                self.post_message(Stepped(step))
            flush()
        except Exception as exc:  # e.g. a stopped comparison still closing its model
            error = str(exc)
        finally:
            self.finished.set()
            self.post_message(Ended(error))

    def on_stepped(self, message: Stepped) -> None:
        message.stop()
        step = message.step
        column = self.query_one(f"#column-{step.index + 1}", AnswerColumn)
        answer = self.comparison.answers[step.index]
        if step.stage == "loading":
            column.note("in memory (the chat's model)" if self.current and answer.model == self.current[0]
                        else "loading…")
        elif step.stage == "answering":
            column.note(("in memory" if answer.load_s is None else f"load {answer.load_s:.2f} s") + " · answering…")
        elif step.stage == "text":
            column.reply.append(display_safe(step.text))
            self.pacer.update()
        else:
            column.note(answer.describe())
            column.reply.finish(display_safe(answer.text))

    def on_ended(self, message: Ended) -> None:
        message.stop()
        if message.error:
            self.notify(message.error, title="Compare failed", severity="error")
        if self.comparison is None or self.comparison.stopped:
            return
        self.phase = "picking"
        for column in self.query(AnswerColumn):
            column.query_one(Button).disabled = not self._pickable(self.comparison.answers[column.index])
        self.query_one("#compare-result", Label).update(
            "Which is better? 1-9 or Pick stores it with each other answer as a preference pair; T stores nothing.")

    @staticmethod
    def _pickable(answer: Answer) -> bool:
        return answer.complete and bool(answer.text.strip())

    # -- picking -------------------------------------------------------------
    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id and event.button.id.startswith("pick-"):
            self.action_pick(int(event.button.id.removeprefix("pick-")))

    def action_pick(self, n: int) -> None:
        if self.phase in ("setup", "running"):
            if self.phase == "running":
                self.notify("wait until every model has answered", severity="warning")
            return
        if self.phase == "done":
            self.notify("this comparison's pick is already stored", severity="warning")
            return
        answers = self.comparison.answers
        if not 1 <= n <= len(answers) or not self._pickable(answers[n - 1]):
            self.notify(f"no complete answer in column {n}", severity="warning")
            return
        chosen = answers[n - 1]
        rejected = [a for a in answers if a is not chosen and self._pickable(a) and a.text != chosen.text]
        self.stored = [self.store.add(self.comparison.prompt, chosen.text, a.text, system=self.system,
                                      chosen_model=chosen.model, rejected_model=a.model) for a in rejected]
        self._finish(n)
        if self.stored:
            others = ", ".join(a.model for a in rejected)
            text = (f"Stored {len(self.stored)} preference pair{'s' if len(self.stored) > 1 else ''}: "
                    f"{chosen.model} (column {n}) preferred over {others}, in {self.store.path}")
        else:
            text = "Nothing stored: every other answer is identical to this one, failed or was empty."
        self.query_one("#compare-result", Label).update(Text(display_safe(text)))
        self.notify(text)

    def action_tie(self) -> None:
        if self.phase == "picking":
            self._finish(None)
            self.query_one("#compare-result", Label).update("Nothing stored (a tie, or both bad).")

    def _finish(self, picked: int | None) -> None:
        self.phase = "done"
        for column in self.query(AnswerColumn):
            column.query_one(Button).disabled = True
            column.set_class(column.index + 1 == picked, "chosen")

    def on_unmount(self) -> None:
        if self.comparison is not None:
            self.comparison.stop()


def open_compare(app, loader=None) -> None:
    """Open the compare view from the chat: GGUF models of the store, the chat's model
    preselected, the chat's draft as the prompt, the chat's sampling and system prompt."""
    from .widgets import PromptInput

    ctl = app.controller
    entries = [e for e in ctl.registry.entries() if e.kind == "gguf" and not e.quarantine]
    current = ctl.model
    if current.name not in {e.name for e in entries}:  # opened by path: listed all the same
        entries.insert(0, current)
    app.push_screen(CompareScreen(
        entries, [current.name], app.query_one(PromptInput).text, ctl.settings, loader=loader or ctl.loader,
        system=ctl.chat.system_prompt if ctl.chat else "", current=(current.name, ctl.engine)))

"""The crofter chat app (Textual).

Layout: chats (search box on top), the conversation, a multi-line input, a status bar and
the footer. A turn (app.turn) runs in a worker thread over `ChatController`; its events reach
the screen only as messages, paced by the measured cost of rendering, so long replies neither
lag the UI nor slow the model. Heavy imports happen in the loading worker after the first frame.
"""
from __future__ import annotations

import gc
import threading
from typing import Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input

from ..render import display_safe
from .messages import CONTRADICTS, Pacer, ReplyDone, ReplyPiece, ThinkingPiece, ToolCallDone, forward
from .tools import approve_on_screen, toggle_tools
from .turns import attach_ids, show_tool_call, toggle_thinking
from . import clipboard, compare, dialogs, keys
from .docs import chat_boxes, docs_status, open_documents, show_sources, warn_if_index_incomplete
from .outbox import Outbox
from .screens import HelpScreen
from .widgets import ChatSidebar, MessageBox, PromptInput, StatusBar


class CrofterApp(App):
    """Chat with local GGUF models."""

    CSS_PATH = "app.tcss"
    TITLE = "crofter"
    # Keys the prompt's TextArea uses (ctrl+a/e/k/u/w/d/x/c/v/y/z, f6, f7) are left to it.
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+g", "edit_last", "Edit & resend"),
        Binding("f3", "copy_reply", "Copy reply"),
        Binding("f4", "copy_code", "Copy code"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+t", "settings", "Sampling"),
        Binding("ctrl+l", "toggle_tools", "Tools on/off"),
        Binding("f5", "documents", "Documents"),
        Binding("ctrl+b", "toggle_thinking", "Thinking", show=False),
        Binding("f9", "compare", "Compare models", show=False),
        Binding("ctrl+s", "system_prompt", "System prompt", show=False),
        Binding("f2", "rename_chat", "Rename", show=False),
        Binding("f8", "delete_chat", "Delete chat", show=False),
        Binding("ctrl+f", "search", "Search", show=False),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, model: str | None = None, chat_id: int | None = None, controller=None, lora=None) -> None:
        super().__init__()
        self._model_name = model
        self._chat_id = chat_id
        self._lora = lora  # a GGUF adapter for the first model only
        self.controller = controller
        self._cancel = threading.Event()
        self._reply_box: MessageBox | None = None
        self.pacer = Pacer()
        self.generating = False
        self.ready = False
        self.loading = True  # a model is being loaded (at start, or after a switch)
        self.outbox = Outbox()  # messages sent while loading, sent in order once ready
        self.replies_done = 0  # finished replies, for tests and benchmarks to wait on
        self.ingests_done = 0  # finished background ingestions

    # -- layout ------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal():
            yield ChatSidebar(id="sidebar")
            with Vertical(id="main"):
                yield VerticalScroll(id="conversation")
                yield PromptInput(id="prompt")
        yield StatusBar("loading model…", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt").focus()
        # Paint the first frame before the loader's heavy imports compete for the GIL.
        self.call_after_refresh(self._load)

    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        """Open the store and load the model off the UI thread."""
        try:
            if self.controller is None:
                from ..chat import ChatController
                from ..config import load as load_settings
                from ..history import HistoryStore

                self.controller = ChatController(HistoryStore(), load_settings())
            ctl = self.controller
            if ctl.engine is None:
                ctl.load_model(self._model_name or ctl.settings.model, self._lora)
            if self._chat_id is not None:
                ctl.open_chat(self._chat_id)
            elif ctl.chat is None:
                chats = ctl.store.chats()
                ctl.open_chat(chats[0].id) if chats and not ctl.store.messages(chats[0].id) else ctl.new_chat()
        except Exception as exc:
            self.call_from_thread(self._fail, exc)
            return
        self.call_from_thread(self._after_load)

    def _fail(self, exc: Exception) -> None:
        self.loading = False
        self.query_one(StatusBar).show("no model loaded", "", "")
        self.notify(str(exc), title="Could not start", severity="error", timeout=30)
        self._return_pending()

    async def _after_load(self) -> None:
        await self._show_chat()
        self.refresh_sidebar()
        self.ready = True
        self.loading = False
        # What is loaded by now lives as long as the app: keep it out of the cyclic GC's
        # full collections, which otherwise stop a streaming reply for 30-50 ms each
        # (GIL held, llama.cpp's token loop waiting). Undone in on_unmount.
        gc.collect()
        gc.freeze()
        if self.controller.engine.template.warning:
            self.notify(self.controller.engine.template.warning, severity="warning", timeout=10)
        await self._send_pending()

    # -- rendering ---------------------------------------------------------
    async def _show_chat(self) -> None:
        ctl = self.controller
        conv = self.query_one("#conversation", VerticalScroll)
        await conv.remove_children()
        await conv.mount_all(chat_boxes(ctl.messages()))
        conv.scroll_end(animate=False)
        self.sub_title = ctl.chat.title
        self.update_status()

    def update_status(self, speed: str = "") -> None:
        ctl = self.controller
        if ctl is None or ctl.engine is None or ctl.session is None:
            return
        try:
            meter = ctl.context_meter().describe()
        except Exception as exc:  # e.g. the history alone no longer fits
            meter = f"ctx: {exc}"
        self.query_one(StatusBar).show(self._label(), speed, meter)

    def _label(self) -> str:
        """Model, tools and documents state for the status bar."""
        ctl = self.controller
        docs = docs_status(ctl)
        return ctl.model.name + (" · tools on" if ctl.tools_enabled else "") + (f" · {docs}" if docs else "")

    def refresh_sidebar(self, only: set[int] | None = None) -> None:
        chats = [c for c in self.controller.store.chats() if only is None or c.id in only]
        self.query_one(ChatSidebar).show(chats, self.controller.chat.id)

    # -- sending -----------------------------------------------------------
    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        if self.loading:
            # Nothing typed is lost: the message waits for the model and goes out when it is ready.
            self.outbox.add(event.text)
            self.query_one(StatusBar).show(f"loading {self._model_name or 'model'}…", "", self.outbox.describe())
            return
        if self.generating or not self.ready:
            # Not sent: the text goes back into the input rather than vanishing.
            prompt = self.query_one(PromptInput)
            if not prompt.text.strip():
                prompt.load_text(event.text)
            self.notify("wait for the current reply (Esc stops it)" if self.generating else "no model is loaded",
                        severity="warning")
            return
        await self._send(event.text)

    async def _send(self, text: str) -> None:
        warn_if_index_incomplete(self)
        await self.begin_reply(lambda cancel: self.controller.send(text, cancel, self.approve), user_text=text)

    def approve(self, tool, arguments: dict, tainted: bool) -> str:
        """Asked from the generation thread about a call the policy leaves to the user."""
        return approve_on_screen(self, tool, arguments, tainted)

    async def _send_pending(self) -> None:
        """Send the next message that waited for the model (the rest follow, one per reply)."""
        if self.outbox.items and self.ready and not self.loading and not self.generating:
            await self._send(self.outbox.take())

    def _return_pending(self) -> None:
        """No model came: what waited goes back into the input, nothing is dropped."""
        if self.outbox.items:
            prompt = self.query_one(PromptInput)
            prompt.load_text(self.outbox.give_back(prompt.text))

    async def on_tool_call_done(self, message: ToolCallDone) -> None:
        await show_tool_call(self, message.call)

    def action_toggle_tools(self) -> None:
        if not self._busy():
            toggle_tools(self)

    async def begin_reply(self, start, user_text: str | None = None) -> None:
        conv = self.query_one("#conversation", VerticalScroll)
        if user_text is not None:
            await conv.mount(MessageBox("user", user_text))
        self._reply_box = MessageBox("assistant", "", note="…", streaming=True)
        self._tool_boxes: list[MessageBox] = []
        await conv.mount(self._reply_box)
        conv.anchor()
        self._cancel = threading.Event()
        self.pacer.restart()
        # A blinking cursor repaints the prompt twice a second: not while a reply streams.
        self.query_one(PromptInput).cursor_blink = False
        self.generating = True
        self._generate(start, self._cancel)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, start, cancel: threading.Event) -> None:
        done, error = None, None
        try:
            done = forward(start(cancel), self.pacer, self.post_message)
        except Exception as exc:  # shown as a notification; the app keeps running
            error = str(exc)
        meter = ""
        try:
            meter = self.controller.context_meter().describe()
        except Exception as exc:
            meter = f"ctx: {exc}"
        self.post_message(ReplyDone(done, meter, error))

    async def on_reply_piece(self, message: ReplyPiece) -> None:
        if self._reply_box is not None:
            self._reply_box.body.append(display_safe(message.text))
        self.pacer.update()

    async def on_thinking_piece(self, message: ThinkingPiece) -> None:
        if self._reply_box is not None:
            await self._reply_box.add_thinking(display_safe(message.text))
        self.pacer.update()

    async def on_reply_done(self, message: ReplyDone) -> None:
        self.generating = False
        self.query_one(PromptInput).cursor_blink = True
        done = message.done
        r = done.result if done is not None else None
        if message.error:
            self.notify(message.error, title="Generation failed", severity="error", timeout=15)
        if done is not None and self._reply_box is not None:
            note = f"{r.completion_tokens} tokens, {r.decode_tokens_per_s:.1f} tok/s" + CONTRADICTS * done.contradicts_result
            self._reply_box.set_note(("stopped · " if done.finish_reason == "cancelled" else "") + note)
            self._reply_box.content = done.answer
            self._reply_box.end_thinking(display_safe(done.thinking))
        if self._reply_box is not None:  # after an error, the streamed text stays as it is
            self._reply_box.body.finish(display_safe(done.answer) if done is not None else None)
        if done is not None:
            attach_ids(self, done.message_ids)
            if done.fit.dropped:
                self.notify(done.fit.describe_dropped(), severity="warning")
        await show_sources(self, done)
        speed = f"{r.decode_tokens_per_s:.1f} tok/s" if r else ""
        self.query_one(StatusBar).show(self._label(), speed, message.meter)
        self.sub_title = self.controller.chat.title
        self.refresh_sidebar()
        self.replies_done += 1  # counted once everything of the reply is on screen (sources panel included)
        await self._send_pending()

    def action_toggle_thinking(self) -> None:
        toggle_thinking(self)

    # -- actions -----------------------------------------------------------
    def action_stop(self) -> None:
        """Esc: close the open dialog (its callback gets None, i.e. "cancel"/"no"), else stop the reply."""
        if isinstance(self.screen, ModalScreen):
            self.screen.dismiss(None)
        elif self.generating:
            self._cancel.set()

    async def action_new_chat(self) -> None:
        if self._busy():
            return
        self.controller.new_chat()
        await self._show_chat()
        self.refresh_sidebar()

    async def action_regenerate(self) -> None:
        if not self._busy():
            await dialogs.regenerate(self)

    def action_edit_last(self) -> None:
        if not self._busy():
            dialogs.edit_and_resend(self)

    def action_copy_reply(self) -> None:
        clipboard.copy_reply(self)

    def action_copy_code(self) -> None:
        clipboard.copy_code(self)

    def action_pick_model(self) -> None:
        if not self._busy():
            dialogs.pick_model(self)

    def switch_model(self, name: str) -> None:
        """Load another model off the UI thread; messages sent meanwhile wait for it."""
        self.loading = True
        self._model_name = name
        self.query_one(StatusBar).show(f"loading {name}…", "", "")
        self._switch(name)

    @work(thread=True, exclusive=True, group="load")
    def _switch(self, name: str) -> None:
        try:
            self.controller.load_model(name)
        except Exception as exc:
            self.call_from_thread(self.notify, str(exc), title="Could not load model", severity="error")
            self.call_from_thread(self._after_switch, False)
            return
        self.call_from_thread(self._after_switch, True)

    async def _after_switch(self, loaded: bool) -> None:
        self.loading = False
        if not loaded:  # the old model stays; what waited for the new one goes back to the input
            self._model_name = self.controller.model.name if self.controller.model else None
            self._return_pending()
        self.update_status()
        await self._send_pending()

    def action_settings(self) -> None:
        dialogs.sampling_settings(self)

    def action_system_prompt(self) -> None:
        dialogs.system_prompt(self)

    def action_rename_chat(self) -> None:
        dialogs.rename_chat(self)

    async def action_delete_chat(self) -> None:
        if self._busy():
            return
        self.controller.store.delete_chat(self.controller.chat.id)
        chats = self.controller.store.chats()
        if chats:
            self.controller.open_chat(chats[0].id)
        else:
            self.controller.new_chat()
        await self._show_chat()
        self.refresh_sidebar()
        self.notify("chat deleted")

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(keys.help_rows(self.BINDINGS)))

    def _busy(self) -> bool:
        if not self.ready or self.loading:
            self.notify("the model is still loading", severity="warning")
            return True
        if self.generating:
            self.notify("a reply is streaming (Esc stops it)", severity="warning")
            return True
        return False

    # -- sidebar -----------------------------------------------------------
    async def on_chat_sidebar_chosen(self, event: ChatSidebar.Chosen) -> None:
        if self._busy() or event.chat_id == self.controller.chat.id:
            return
        self.controller.open_chat(event.chat_id)
        await self._show_chat()
        self.query_one("#prompt").focus()

    def on_chat_sidebar_searched(self, event: ChatSidebar.Searched) -> None:
        if self.ready:
            self.refresh_sidebar({h.chat_id for h in self.controller.store.search(event.text)} if event.text else None)

    # -- command palette ---------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from keys.palette_commands(self)

    def action_documents(self) -> None:
        if not self._busy():
            open_documents(self)

    def action_compare(self) -> None:
        if not self._busy():
            compare.open_compare(self)

    def on_unmount(self) -> None:
        gc.unfreeze()
        if self.controller is not None and self.controller.engine is not None:
            self._cancel.set()
        if self.controller is not None:
            self.controller.close_documents()

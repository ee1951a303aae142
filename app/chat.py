"""The chat app's logic without a screen: chats, models, sampling, history commits.

`ChatController` is what the Textual app drives (and what tests drive directly):
it ties the history store, the loaded engine and a `ChatSession` together, so
that widgets only render and route. Commit rules: the user's message is stored
before generation starts; the reply is stored in one transaction when it ends,
marked ``incomplete`` if the user stopped it (or a remote model's stream broke), and absent if
the process died.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from models.registry import ModelEntry, Registry

from .budget import reply_reserve
from .config import Settings
from .engine import Engine, EngineError, LoadOptions, Sampling
from .history import Chat, HistoryStore, Message
from .session import ChatSession
from .turn import Done, TurnTools, run_turn

TITLE_CHARS = 48


@dataclass
class ContextMeter:
    """Where the context window goes, in tokens (what the status bar shows)."""

    n_ctx: int
    system: int
    history: int
    reserve: int
    dropped_messages: int

    @property
    def used(self) -> int:
        return self.system + self.history

    def describe(self) -> str:
        """E.g. 'ctx sys 12 + hist 380 + reply 512 / 4096 (88% free)'."""
        free = max(0, self.n_ctx - self.used - self.reserve)
        text = f"ctx sys {self.system} + hist {self.history} + reply {self.reserve} / {self.n_ctx} ({100 * free // self.n_ctx}% free)"
        return text + (f" · dropped {self.dropped_messages} old msgs" if self.dropped_messages else "")


def default_loader(entry: ModelEntry, settings: Settings, lora=None) -> Engine:
    """The engine of `entry`: a GGUF loaded here (with a GGUF LoRA adapter applied when `lora`
    names one), or a remote server's model (app/remote.py)."""
    if entry.kind == "remote":
        if lora is not None:
            raise EngineError(f"{entry.name}: a remote model cannot take a local adapter ({lora})")
        from .remote import RemoteEngine

        return RemoteEngine.connect(entry)
    return Engine.load(entry, dataclasses.replace(LoadOptions.from_settings(settings), lora=lora))


class ChatController:
    """One open chat at a time, over one loaded model."""

    def __init__(self, store: HistoryStore, settings: Settings, registry: Registry | None = None,
                 loader: Callable[[ModelEntry, Settings], Engine] = default_loader):
        self.store = store
        self.settings = settings
        self.registry = registry or Registry()
        self.loader = loader  # how models load (the compare view loads its models the same way)
        self.engine: Engine | None = None
        self.model: ModelEntry | None = None
        self.chat: Chat | None = None
        self.session: ChatSession | None = None
        self.tools_enabled = False
        self._tools = None  # ToolRegistry, discovered on first use
        self._tools_key: tuple = ()  # the attached collections the registry's search_documents covers
        self._docs = None  # documents.DocsService, created on first use
        self.allowed_in_chat: set[tuple[int, str]] = set()  # (chat id, tool) the user approved for the chat

    # -- models ------------------------------------------------------------
    def load_model(self, name: str, lora=None) -> ModelEntry:
        """Load `name` (registry name or path), replacing the current engine; `lora`: a GGUF
        LoRA adapter for that model, applied unmerged (a later switch loads the plain model)."""
        entry = self.registry.resolve(name)
        engine = self.loader(entry, self.settings) if lora is None else self.loader(entry, self.settings, lora)
        if self.engine is not None:
            self.engine.close()
        self.engine, self.model = engine, entry
        if self.chat is not None:
            self.chat = self.store.update_chat(self.chat.id, model=entry.name)
            self._rebuild_session()
        return entry

    def sampling(self) -> Sampling:
        return Sampling.from_settings(self.settings)

    def update_settings(self, **changes) -> None:
        """Change sampling settings (validated by Settings) for the following turns."""
        self.settings = self.settings.replace(**changes)
        if self.session is not None:
            self.session.sampling = self.sampling()

    # -- chats -------------------------------------------------------------
    def new_chat(self) -> Chat:
        self.chat = self.store.new_chat(model=self.model.name if self.model else None, system_prompt=self.settings.system_prompt)
        self._rebuild_session()
        return self.chat

    def open_chat(self, chat_id: int) -> Chat:
        self.chat = self.store.chat(chat_id)
        self._rebuild_session()
        return self.chat

    def set_system_prompt(self, text: str) -> None:
        self.chat = self.store.update_chat(self.chat.id, system_prompt=text)
        self._rebuild_session()

    def messages(self) -> list[Message]:
        return self.store.messages(self.chat.id) if self.chat else []

    def _rebuild_session(self) -> None:
        history = [self.for_model(m) for m in self.store.messages(self.chat.id)]
        self.session = ChatSession(self.engine, self.sampling(), system=self.chat.system_prompt, messages=history)

    @staticmethod
    def for_model(m: Message) -> dict:
        """A stored message as the model sees it: tool calls come back as their results."""
        if m.role == "tool":
            from .tools.calling import ToolCall, result_message

            return {"role": "user", "content": result_message(ToolCall(**json.loads(m.content)))}
        return {"role": m.role, "content": m.content}

    # -- turns -------------------------------------------------------------
    def _store_user(self, text: str) -> Message:
        if self.chat is None:
            self.new_chat()
        message = self.store.add_message(self.chat.id, "user", text)
        if self.chat.title == "New chat":
            title = " ".join(text.split())
            self.chat = self.store.update_chat(self.chat.id, title=title[:TITLE_CHARS] + ("…" if len(title) > TITLE_CHARS else ""))
        return message

    def send(self, text: str, cancel: threading.Event | None = None,
             approve: Callable[[object, dict, bool], str] | None = None) -> Iterator:
        """Store the user's message, run the turn (turn.run_turn), store what it produced.

        With tools on, `approve(tool, arguments, tainted) -> "yes" | "chat" | "no"` is asked for calls
        the policy marks `ask` ("chat" remembers the yes for this chat; no approver: no).
        Otherwise, with collections attached, the question goes to the model with retrieved
        passages as numbered sources and the reply is stored with the sources it cites."""
        user = self._store_user(text)
        return self._commit(run_turn(self.session, text, cancel=cancel, **self._uses(approve)), [user.id])

    def _uses(self, approve) -> dict:
        """What a turn of this chat may use: tools (when on), else its collections' passages."""
        if self.tools_enabled:
            return {"tools": self._turn_tools(approve)}
        if self.chat.collections:
            return {"ground": self.documents().grounder(list(self.chat.collections))}
        return {}

    def _turn_tools(self, approve) -> TurnTools:
        from .tools.policy import Policy

        chat_id = self.chat.id

        def ask(tool, arguments, tainted: bool) -> bool:
            # A yes remembered for the chat never covers a side-effecting call that
            # documents or tool output may have prompted: that one is asked again.
            if (chat_id, tool.name) in self.allowed_in_chat and not (tainted and tool.side_effects):
                return True
            answer = approve(tool, arguments, tainted) if approve is not None else "no"
            if answer == "chat":
                self.allowed_in_chat.add((chat_id, tool.name))
            return answer in ("yes", "chat")

        return TurnTools(self.tool_registry(), Policy(), ask)

    # -- documents ---------------------------------------------------------
    def documents(self):
        if self._docs is None:
            from .documents import DocsService

            self._docs = DocsService(self.settings)
        return self._docs

    @property
    def docs_open(self):
        """The documents service if it was started (None: nothing opened or indexing yet)."""
        return self._docs

    def close_documents(self) -> None:
        if self._docs is not None:
            self._docs.close()
            self._docs = None

    def attach_collections(self, names: list[str]) -> Chat:
        """Answer this chat's questions from these collections (empty: none)."""
        if names:
            known = {c.name for c in self.documents().collections()} | set(self.documents().ingesting)
            missing = [n for n in names if n not in known]
            if missing:
                from rag.store import RagError

                raise RagError(f"no collection named {missing[0]!r}")
        if self.chat is None:
            self.new_chat()
        self.chat = self.store.update_chat(self.chat.id, collections=list(names))
        return self.chat

    def tool_registry(self):
        key = tuple(self.chat.collections) if self.chat is not None else ()
        if self._tools is None or key != self._tools_key:
            from .tools.registry import ToolRegistry

            search = self.documents().search(list(key)) if key else None
            self._tools = ToolRegistry.for_settings(self.settings, search)
            self._tools_key = key
        return self._tools

    def regenerate(self, cancel: threading.Event | None = None, approve=None) -> Iterator:
        """Answer the last user message again (over documents: retrieved again; with tools: the
        whole tool turn). The reply it replaces is kept as an alternative: `browse_reply` and
        `mark_reply` turn them into preference data (chat_export)."""
        msgs = self.messages()
        user = next((m for m in reversed(msgs) if m.role == "user"), None)
        if user is None:
            raise ValueError("no user message to answer again")
        after = [m for m in msgs if m.id > user.id]
        replies = [m for m in after if m.role == "assistant" and m.content.strip()]
        if replies:
            self.store.set_aside(replies[-1], user.id)
        if after:
            self.store.delete_messages_from(self.chat.id, after[0].id)
        self._rebuild_session()
        self.session.messages.pop()  # the turn adds the user's message back (grounded again, if it was)
        return self._commit(run_turn(self.session, user.content, cancel=cancel, **self._uses(approve)), [])

    def alternatives(self):
        """(the last reply, the earlier replies to its user message), for browsing."""
        msgs = self.messages()
        user = next((m for m in reversed(msgs) if m.role == "user"), None)
        reply = msgs[-1] if msgs and msgs[-1].role == "assistant" else None
        if user is None or reply is None:
            return reply, []
        return reply, self.store.alternatives(self.chat.id, user.id)

    def browse_reply(self, step: int = 1) -> tuple[Message, int]:
        """Show the next (1) or previous (-1) of the last reply's versions in its place (the chat
        continues from whichever is shown); returns it and how many versions there are."""
        reply, alts = self.alternatives()
        if reply is None or not alts:
            raise ValueError("the last reply has no earlier versions (Ctrl+R answers again and keeps this one)")
        message = self.store.rotate(reply, alts, step)
        self._rebuild_session()
        return message, len(alts) + 1

    def mark_reply(self, message_id: int, mark: int | None = None, preferred: bool | None = None) -> Message:
        """Thumbs up (1) / down (-1) / none; `preferred`: this reply over its alternatives."""
        return self.store.mark(message_id, mark, preferred)

    def edit_and_resend(self, message_id: int, text: str, cancel: threading.Event | None = None, approve=None) -> Iterator:
        """Replace a user message (and drop everything after it), then answer it."""
        target = self.store.message(message_id)
        if target.chat_id != self.chat.id or target.role != "user":
            raise ValueError("only a user message of the open chat can be edited")
        self.store.delete_messages_from(self.chat.id, message_id)
        self._rebuild_session()
        return self.send(text, cancel, approve)

    def _commit(self, events: Iterator, ids: list[int]) -> Iterator:
        """Pass the turn's events on; when it is done, store its tool calls and its reply
        (``incomplete`` if stopped) in the history and give `Done.message_ids` their ids."""
        for ev in events:
            if isinstance(ev, Done):
                chat_id, model = self.chat.id, self.model.name if self.model else None
                for call in ev.calls:
                    ids.append(self.store.add_message(
                        chat_id, "tool", json.dumps(dataclasses.asdict(call), ensure_ascii=False)).id)
                r = ev.result
                ids.append(self.store.add_message(
                    chat_id, "assistant", ev.answer, model=model,
                    sampling={f.name: getattr(self.session.sampling, f.name) for f in dataclasses.fields(Sampling)
                              if f.name not in ("stop", "grammar", "json_schema")},
                    prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                    ttft_s=r.ttft_s, tokens_per_s=r.decode_tokens_per_s,
                    # "error": a remote model's stream broke mid-reply; what came is kept, marked.
                    status="incomplete" if ev.finish_reason in ("cancelled", "error") else "complete",
                    sources=[src.as_dict() for src in ev.cited] if ev.grounded else None,
                    thinking=ev.thinking or None,
                ).id)
                ev.message_ids = ids
            yield ev

    def context_meter(self, draft: str = "") -> ContextMeter:
        """Token use of the next turn (with `draft` as the user's message, if any)."""
        msgs = list(self.session.messages)
        if draft:
            msgs.append({"role": "user", "content": draft})
        eng = self.engine
        system = [m for m in msgs[:1] if m["role"] == "system"]
        sys_tokens = len(eng.tokenize_chat(system)) if system else 0
        if msgs == system:
            return ContextMeter(eng.n_ctx, sys_tokens, 0, reply_reserve(self.settings.max_tokens, eng.n_ctx), 0)
        fit = self.session.fit(msgs)
        return ContextMeter(eng.n_ctx, sys_tokens, len(fit.prompt_tokens) - sys_tokens, fit.reserve, len(fit.dropped))

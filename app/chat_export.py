"""The chat history exported: one chat as Markdown or JSON, and the preference data in every chat.

Preference pairs come from what the user did in the chat app: a reply marked preferred is
`chosen` against each alternative a regenerate set aside (`rejected`); thumbs up/down marks are
unpaired examples (KTO-style `label`). Each prompt is the conversation up to the user's message,
as messages (system prompt first), what `crofter tune dpo --data` reads.
"""
from __future__ import annotations

import time
from dataclasses import asdict

from .history import HistoryStore


def as_json(store: HistoryStore, chat_id: int) -> dict:
    chat = store.chat(chat_id)
    return {"chat": asdict(chat), "messages": [asdict(m) for m in store.messages(chat_id)],
            "alternatives": [asdict(a) for m in store.messages(chat_id) if m.role == "user"
                             for a in store.alternatives(chat_id, m.id)]}


def as_markdown(store: HistoryStore, chat_id: int) -> str:
    chat = store.chat(chat_id)
    lines = [f"# {chat.title}", "", f"- model: {chat.model or '-'}",
             f"- created: {time.strftime('%Y-%m-%d %H:%M', time.localtime(chat.created))}", ""]
    if chat.system_prompt:
        lines += ["## System", "", chat.system_prompt, ""]
    for m in store.messages(chat_id):
        head = m.role.capitalize() + (" (incomplete)" if m.status == "incomplete" else "")
        lines += [f"## {head}", "", m.content, ""]
        if m.sources:
            lines += ["Sources:", ""] + [
                f"- [{s['n']}] {s['source']}" + (f" p. {s['page']}" if s.get("page") else "")
                + (f" > {s['heading']}" if s.get("heading") else "") + f", chars {s['start']}-{s['end']}"
                for s in m.sources] + [""]
    return "\n".join(lines)


def _replies(store: HistoryStore, chat_ids: list[int] | None):
    """(chat, prompt messages, the user message, the reply) for every reply in the chats."""
    from .chat import ChatController

    for chat in [store.chat(i) for i in chat_ids] if chat_ids else store.chats():
        msgs = store.messages(chat.id)
        head = [{"role": "system", "content": chat.system_prompt}] if chat.system_prompt else []
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            user = next((u for u in reversed(msgs[:i]) if u.role == "user"), None)
            if user is None:
                continue
            prompt = head + [ChatController.for_model(p) for p in msgs[:msgs.index(user) + 1]]
            yield chat, prompt, user, m


def preference_pairs(store: HistoryStore, chat_ids: list[int] | None = None) -> list[dict]:
    """A pair per alternative of each reply marked preferred (identical texts are no preference)."""
    out = []
    for chat, prompt, user, reply in _replies(store, chat_ids):
        if not reply.preferred:
            continue
        for alt in store.alternatives(chat.id, user.id):
            if alt.content.strip() and alt.content != reply.content:
                out.append({"prompt": prompt, "chosen": reply.content, "rejected": alt.content,
                            "chosen_model": reply.model, "rejected_model": alt.model,
                            "source": f"chat {chat.id}", "message_id": reply.id})
    return out


def training_pairs(store: HistoryStore, chat_ids: list[int] | None = None, with_compare: bool = False) -> list[dict]:
    """The pairs `chats export --prefs` writes and a journey's `data: chats` trains on: the
    preferred replies' pairs, plus the compare view's picks when asked."""
    pairs = preference_pairs(store, chat_ids)
    if with_compare:
        from .preferences import PreferenceStore

        pairs += PreferenceStore().exportable()
    return pairs


def marks(store: HistoryStore, chat_ids: list[int] | None = None) -> list[dict]:
    """Every reply with a thumbs up or down: prompt, completion, label (True: up)."""
    return [{"prompt": prompt, "completion": reply.content, "label": reply.mark == 1,
             "model": reply.model, "source": f"chat {chat.id}", "message_id": reply.id}
            for chat, prompt, user, reply in _replies(store, chat_ids) if reply.mark is not None]

"""The app's dialog-driven actions: open a modal, apply what the user chose.

Each function takes the running CrofterApp; the app's key bindings call them.
"""
from __future__ import annotations

from dataclasses import asdict

from .screens import ModelPicker, SettingsScreen, TextPrompt
from .widgets import MessageBox


def pick_model(app) -> None:
    from models.info import describe

    names = []
    for e in app.controller.registry.entries():
        if e.kind == "gguf":
            d = describe(e)
            names.append((e.name, f"{d.get('parameters_human', '')} {d.get('quantization') or ''}".strip()))
        elif e.kind == "remote":  # a server's model (models add-remote): chats, tools and documents alike
            names.append((e.name, f"remote {e.model or ''} at {e.path}".replace("  ", " ")))

    def chosen(name: str | None) -> None:
        if name and name != app.controller.model.name:
            app.switch_model(name)

    app.push_screen(ModelPicker(names, app.controller.model.name), chosen)


def sampling_settings(app) -> None:
    def apply(changes: dict | None) -> None:
        if not changes:
            return
        try:
            app.controller.update_settings(**changes)
        except Exception as exc:  # ConfigError names the field
            app.notify(str(exc), title="Setting refused", severity="error")
            return
        app.notify("sampling settings updated")
        app.update_status()

    app.push_screen(SettingsScreen(asdict(app.controller.settings)), apply)


def system_prompt(app) -> None:
    def apply(text: str | None) -> None:
        if text is not None:
            app.controller.set_system_prompt(text.strip())
            app.update_status()
            app.notify("system prompt set for this chat")

    app.push_screen(TextPrompt("System prompt for this chat", app.controller.chat.system_prompt, multiline=True), apply)


def rename_chat(app) -> None:
    def apply(title: str | None) -> None:
        if title and title.strip():
            ctl = app.controller
            ctl.chat = ctl.store.update_chat(ctl.chat.id, title=title.strip())
            app.sub_title = ctl.chat.title
            app.refresh_sidebar()

    app.push_screen(TextPrompt("Rename chat", app.controller.chat.title), apply)


def edit_and_resend(app) -> None:
    """Edit the focused user message (else the last one) and answer it again; later messages go."""
    ctl = app.controller
    users = [m for m in ctl.messages() if m.role == "user"]
    if not users:
        app.notify("no message to edit", severity="warning")
        return
    focused = app.focused
    picked = [m for m in users if isinstance(focused, MessageBox) and m.id == focused.message_id]
    target = picked[0] if picked else users[-1]

    async def resend(text: str | None) -> None:
        if not (text and text.strip()):
            return
        boxes = list(app.query(MessageBox))
        ids = [b.message_id for b in boxes]
        if target.id not in ids:  # the view lost track of the store: refuse rather than guess
            app.notify("cannot find that message on screen; reopen the chat", severity="error")
            return
        for box in boxes[ids.index(target.id):]:
            await box.remove()
        new = text.strip()
        await app.begin_reply(lambda cancel: ctl.edit_and_resend(target.id, new, cancel, app.approve), user_text=new)

    app.push_screen(TextPrompt("Edit and resend", target.content, multiline=True), resend)


async def regenerate(app) -> None:
    """Replace the last reply: drop its widgets (tool calls and sources panel included) and
    generate again; with tools on, the whole tool turn runs again, not a plain reply."""
    ctl = app.controller
    if not any(m.role == "user" for m in ctl.messages()):
        app.notify("nothing to regenerate yet", severity="warning")
        return
    children = list(app.query_one("#conversation").children)
    last_user = max((i for i, w in enumerate(children) if isinstance(w, MessageBox) and w.role == "user"), default=-1)
    for w in children[last_user + 1:]:
        await w.remove()
    await app.begin_reply(lambda cancel: ctl.regenerate(cancel, app.approve))

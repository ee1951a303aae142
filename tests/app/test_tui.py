"""The chat app driven with Textual's Pilot, on the real bundled model."""
from __future__ import annotations

import gc
import re


from app.tui.app import CrofterApp
from app.tui.tools import approve_on_screen
from app.tui.widgets import ChatItem, MessageBox, status_text

from .pilot import SIZE, boxes, controller, say, screen_text, start, wait_for

async def test_ask_see_streamed_answer_and_history(engine):
    ctl = controller(engine)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        before = status_text(app)
        await say(pilot, "What is the capital of France?")
        shown = boxes(app)
        assert shown[0] == ("user", "What is the capital of France?")
        assert shown[1][0] == "assistant" and shown[1][1].strip()
        stored = ctl.store.messages(ctl.chat.id)
        assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "complete")]
        assert stored[1].content == shown[1][1]
        assert stored[1].completion_tokens > 0 and stored[1].tokens_per_s > 0
        after = status_text(app)
        assert "tok/s" in after and before != after  # the context meter moved
        assert ctl.chat.title == "What is the capital of France?"
        # the reply on screen is the stored text, rendered as Markdown
        body = app.query(MessageBox).last().body
        rendered = " ".join(s.text for s in body._lines)
        words = re.findall(r"[A-Za-z]{3,}", stored[1].content)[:8]
        assert not body.streaming and words and all(w in rendered for w in words), (words, rendered)
        assert gc.get_freeze_count() > 0  # the long-lived objects are out of the GC's way
    assert gc.get_freeze_count() == 0  # and back in it once the app is gone


async def test_new_switch_rename_delete_search(engine):
    ctl = controller(engine, max_tokens=8)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await say(pilot, "Tell me about zebras")
        first = ctl.chat.id
        await pilot.press("ctrl+n")
        await say(pilot, "Tell me about volcanoes")
        second = ctl.chat.id
        assert first != second
        items = list(app.query(ChatItem))
        assert [i.chat_id for i in items] == [second, first]
        # switch to the first chat from the sidebar
        app.query_one("#chats").focus()
        app.query_one("#chats").index = 1
        await pilot.press("enter")
        await wait_for(pilot, lambda: ctl.chat.id == first)
        assert boxes(app)[0] == ("user", "Tell me about zebras")
        # rename
        await pilot.press("f2")
        await wait_for(pilot, lambda: len(app.screen_stack) > 1)
        app.screen.query_one("#value").value = "Stripes [b]&[/b] co"
        await pilot.press("enter")
        await wait_for(pilot, lambda: ctl.chat.title == "Stripes [b]&[/b] co")
        # search narrows the sidebar to matching chats
        app.query_one("#search").value = "volcanoes"
        await wait_for(pilot, lambda: [i.chat_id for i in app.query(ChatItem)] == [second])
        app.query_one("#search").value = ""
        await wait_for(pilot, lambda: len(list(app.query(ChatItem))) == 2)
        # delete the open chat
        await pilot.press("f8")
        await wait_for(pilot, lambda: ctl.chat.id == second)
        assert [c.id for c in ctl.store.chats()] == [second]


async def test_stop_mid_stream_marks_incomplete(engine):
    ctl = controller(engine, max_tokens=400)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        prompt = app.query_one("#prompt")
        prompt.load_text("Write a very long story about a dragon.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.generating and app._reply_box is not None)
        await wait_for(pilot, lambda: len(app._reply_box.body.text) > 20)  # some of it is on screen
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.replies_done == 1)
        last = ctl.store.messages(ctl.chat.id)[-1]
        assert last.role == "assistant" and last.status == "incomplete"
        assert last.completion_tokens < 400
        assert "stopped" in app.query(MessageBox).last().note


async def test_regenerate_replaces_the_reply(engine):
    ctl = controller(engine, temperature=1.0, seed=-1, max_tokens=16)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await say(pilot, "Name a fruit.")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.replies_done == 2)
        stored = ctl.store.messages(ctl.chat.id)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert [b[0] for b in boxes(app)] == ["user", "assistant"]
        assert boxes(app)[1][1] == stored[1].content


async def test_edit_and_resend(engine):
    ctl = controller(engine, max_tokens=8)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await say(pilot, "Name a colour.")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.screen_stack) > 1)
        app.screen.query_one("#value").load_text("Name an animal.")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.replies_done == 2)
        stored = ctl.store.messages(ctl.chat.id)
        assert [(m.role, m.content if m.role == "user" else "") for m in stored] == [("user", "Name an animal."), ("assistant", "")]


async def test_markup_and_escapes_render_literally(engine):
    ctl = controller(engine)
    chat = ctl.store.new_chat(title="[red]hostile[/] \x1b[31m")
    hostile = "[bold]not bold[/] [/ \x1b[31mred\x1b[0m [link=file:///etc]x[/link] \u202eevil\u202c"
    ctl.store.add_message(chat.id, "user", hostile)
    ctl.store.add_message(chat.id, "assistant", "Reply with " + hostile + "\n\n```\ncode [/]\n```")
    app = CrofterApp(controller=ctl, chat_id=chat.id)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        user_box = app.query(MessageBox).first()
        plain = user_box.body.render().plain
        assert "[bold]not bold[/]" in plain and "␛[31mred" in plain and "\x1b" not in plain
        assert "⟨U+202E⟩evil⟨U+202C⟩" in plain and "\u202e" not in plain  # named, not obeyed
        shown = screen_text(app)
        assert "[bold]not bold[/]" in shown
        assert "[red]hostile[/]" in shown  # the sidebar title, literally
        assert "code [/]" in shown  # inside the reply's code block


async def test_a_100k_character_line_renders_whole(engine):
    ctl = controller(engine)
    chat = ctl.store.new_chat(title="long")
    ctl.store.add_message(chat.id, "user", "x" * 100_000)
    app = CrofterApp(controller=ctl, chat_id=chat.id)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        box = app.query(MessageBox).first()
        assert box.content == "x" * 100_000 and box.body.render().plain.count("x") == 100_000


async def test_errors_become_notifications(engine):
    ctl = controller(engine)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: len(app.screen_stack) > 1)
        app.screen.query_one("#set-temperature").value = "hot"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(app.screen_stack) == 1)
        notes = [n.message for n in app._notifications]
        assert any("temperature" in n for n in notes), notes
        assert ctl.settings.temperature == 0.0  # unchanged, and the app still runs
        await pilot.press("f3")  # nothing to copy yet: a warning, not a crash
        assert app.is_running


async def test_help_and_copy(engine):
    ctl = controller(engine, max_tokens=24)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await say(pilot, "Write a python hello world in a code block.")
        copied = []
        app.copy_to_clipboard = copied.append
        await pilot.press("f3")
        assert copied == [ctl.store.messages(ctl.chat.id)[-1].content]
        await pilot.press("f1")
        await wait_for(pilot, lambda: len(app.screen_stack) > 1)
        assert "Regenerate" in screen_text(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: len(app.screen_stack) == 1)


def test_prompt_history_recall_and_newline():
    """Up recalls sent messages; Ctrl+J adds a line instead of sending."""
    import asyncio

    from textual.app import App

    from app.tui.widgets import PromptInput

    class One(App):
        def compose(self):
            yield PromptInput()

    async def run():
        app = One()
        sent = []
        async with app.run_test() as pilot:
            box = app.query_one(PromptInput)
            app.on_prompt_input_submitted = lambda m: sent.append(m.text)
            box.focus()
            await pilot.press(*"first", "enter", *"second", "enter")
            await pilot.pause()
            await pilot.press("up")
            assert box.text == "second"
            await pilot.press("up")
            assert box.text == "first"
            await pilot.press("down", "down")
            assert box.text == ""
            await pilot.press(*"a", "ctrl+j", *"b")
            assert box.text == "a\nb"
        return box.sent

    assert asyncio.run(run()) == ["first", "second"]


async def test_edit_an_earlier_focused_message(engine):
    ctl = controller(engine, max_tokens=8)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await say(pilot, "Name a colour.")
        await say(pilot, "Name a number.")
        first_user = app.query(MessageBox).first()
        assert first_user.message_id == ctl.store.messages(ctl.chat.id)[0].id
        first_user.focus()
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.screen_stack) > 1)
        assert app.screen.query_one("#value").text == "Name a colour."
        app.screen.query_one("#value").load_text("Name a planet.")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.replies_done == 3)
        stored = ctl.store.messages(ctl.chat.id)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[0].content == "Name a planet."


def test_context_meter_parts(engine):
    ctl = controller(engine, system_prompt="You are brief.", max_tokens=100)
    ctl.load_model("smollm2-135m")
    ctl.new_chat()
    empty = ctl.context_meter()
    assert empty.system > 0 and empty.history == 0 and empty.reserve == 100 and empty.n_ctx == 2048
    drafted = ctl.context_meter("What is the capital of France?")
    assert drafted.history > 0 and drafted.system == empty.system
    assert "sys" in drafted.describe() and "/ 2048" in drafted.describe()


async def test_tool_approval_modal_answers_the_worker(engine):
    import threading as th

    from app.tools.schema import tool as make_tool

    def send_file(path: str) -> str:
        """Send a file somewhere."""

    ctl = controller(engine)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        results = []
        t = make_tool(send_file)
        for key, expected in (("y", "yes"), ("a", "chat"), ("n", "no"), ("escape", "no")):
            worker = th.Thread(target=lambda: results.append(approve_on_screen(app, t, {"path": "~/.ssh/id_rsa"}, True)))
            worker.start()
            await wait_for(pilot, lambda: len(app.screen_stack) > 1 and "~/.ssh/id_rsa" in screen_text(app))
            assert "send_file" in screen_text(app)  # polled above: a loaded machine paints the dialog later
            assert "may come from them" in screen_text(app)  # the taint warning
            await pilot.press(key)
            await wait_for(pilot, lambda: not worker.is_alive())
            assert results[-1] == expected
            await wait_for(pilot, lambda: len(app.screen_stack) == 1)  # the dialog closed


async def test_tools_turn_stores_and_shows_calls(engine):
    ctl = controller(engine, max_tokens=64)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await pilot.press("ctrl+l")
        assert ctl.tools_enabled and "tools on" in status_text(app)
        await say(pilot, "What is 17 * 23? Use the calculator.")
        stored = ctl.store.messages(ctl.chat.id)
        assert stored[0].role == "user" and stored[-1].role == "assistant"
        assert all(m.role == "tool" for m in stored[1:-1])
        shown = [b.role for b in app.query(MessageBox)]
        assert shown == [m.role for m in stored]
        assert boxes(app)[-1][1] == stored[-1].content, [n.message for n in app._notifications]
        # Regenerate with tools on runs the whole tool turn again (not a plain reply).
        done = app.replies_done
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.replies_done > done)
        again = ctl.store.messages(ctl.chat.id)
        assert [m.role for m in again if m.role != "tool"] == ["user", "assistant"]
        assert again[0].content == "What is 17 * 23? Use the calculator."
        assert [b.role for b in app.query(MessageBox)] == [m.role for m in again]

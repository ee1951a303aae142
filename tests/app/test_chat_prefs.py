"""Preferences from the user's own chats: a regenerate keeps the earlier reply as another version,
the versions can be browsed (the shown one continues the chat), a reply can be marked preferred
or thumbs up/down, and `crofter chats export --prefs/--marks` turns that into training data
that `crofter tune dpo` reads. Replies come from the real bundled model; seeds differ per version,
and whatever the model said, the pairs must hold exactly the stored texts."""
from __future__ import annotations

import json

import pytest

from app import chat_export
from app.cli import main
from app.history import HistoryStore
from app.tui.app import CrofterApp
from app.tui.widgets import MessageBox
from app.turn import finish
from finetune.data import load_preferences

from .pilot import SIZE, controller, say, screen_text, start, wait_for


def _distinct_reply(ctl, seen: set[str]) -> str:
    """Regenerate until the reply differs from the ones seen (temperature 1, fresh seeds)."""
    for seed in range(1, 20):
        ctl.update_settings(seed=seed)
        text = finish(ctl.regenerate()).answer
        if text.strip() and text not in seen:
            return text
    raise AssertionError("twenty seeds gave no new reply")


@pytest.fixture
def chat_with_versions(engine):
    ctl = controller(engine, temperature=1.0, max_tokens=12, system_prompt="Be brief.")
    ctl.load_model("smollm2-135m")
    ctl.new_chat()
    first = finish(ctl.send("Name a fruit.")).answer
    assert first.strip()
    second = _distinct_reply(ctl, {first})
    third = _distinct_reply(ctl, {first, second})
    return ctl, [first, second, third]


def test_regenerate_keeps_versions_and_browsing_visits_each(chat_with_versions):
    ctl, (first, second, third) = chat_with_versions
    reply, alts = ctl.alternatives()
    assert reply.content == third and [a.content for a in alts] == [first, second]
    assert [m.role for m in ctl.messages()] == ["user", "assistant"]  # one reply in the chat at a time
    seen = [ctl.browse_reply(1)[0].content for _ in range(3)]
    assert seen == [first, second, third]  # round the ring, back where it started
    message, versions = ctl.browse_reply(-1)
    assert (message.content, versions) == (second, 3)
    assert ctl.session.messages[-1] == {"role": "assistant", "content": second}  # the chat continues from it


def test_preferred_and_marked_replies_export_as_dpo_pairs_and_kto_marks(chat_with_versions, tmp_path, capsys):
    ctl, (first, second, third) = chat_with_versions
    reply, _ = ctl.alternatives()
    ctl.mark_reply(reply.id, 1, preferred=True)
    pairs = chat_export.preference_pairs(HistoryStore())
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(third, first), (third, second)]
    assert pairs[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]

    out, marks = tmp_path / "prefs.jsonl", tmp_path / "marks.jsonl"
    assert main(["chats", "export", "--prefs", str(out), "--marks", str(marks)]) == 0
    loaded = load_preferences(out)  # what `crofter tune dpo --data` reads
    assert len(loaded) == 2 and loaded[0]["chosen"][-1]["content"] == third
    [mark] = [json.loads(line) for line in marks.read_text().splitlines()]
    assert (mark["completion"], mark["label"]) == (third, True)

    ctl.browse_reply(1)  # another version shown: the marks stayed with the text they were given to
    assert chat_export.preference_pairs(HistoryStore()) == [] and chat_export.marks(HistoryStore()) == []
    assert main(["chats", "export", "--prefs", str(tmp_path / "none.jsonl")]) == 1
    assert "no preference pairs" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


def test_editing_the_question_drops_its_versions(chat_with_versions):
    ctl, _ = chat_with_versions
    user = ctl.messages()[0]
    finish(ctl.edit_and_resend(user.id, "Name a colour."))
    assert ctl.alternatives()[1] == []  # they answered a question that is gone
    assert HistoryStore().db.execute("SELECT COUNT(*) FROM alternatives").fetchone()[0] == 0


async def test_a_focused_reply_takes_marks_and_browses_its_versions(engine):
    ctl = controller(engine, temperature=1.0, max_tokens=12)
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await say(pilot, "Name a fruit.")
        first = ctl.messages()[-1].content
        second = None
        for seed in range(1, 20):
            ctl.update_settings(seed=seed)
            done = app.replies_done
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.replies_done > done)
            second = ctl.messages()[-1].content
            if second != first and second.strip():
                break
        assert second != first
        box = [b for b in app.query(MessageBox) if b.role == "assistant"][-1]
        box.focus()
        await pilot.press("plus", "p")
        await pilot.pause()
        stored = ctl.messages()[-1]
        assert (stored.mark, stored.preferred, box.message_id) == (1, 1, stored.id)
        await wait_for(pilot, lambda: "marked good · preferred · 2 versions" in screen_text(app), timeout=10)
        await pilot.press("left")
        await pilot.pause()
        assert ctl.messages()[-1].content == box.content == first and ctl.messages()[-1].mark is None
        await pilot.press("minus")
        await pilot.pause()
        assert ctl.messages()[-1].mark == -1

"""Every front door renders the one turn: the same scripted turn (plain, grounded, tools,
thinking) through `crofter ask`, the chat app and `crofter serve`, and what each shows.

`turn.run_turn` is replaced by a script of events, so what is checked is only the front
door's part: that it passes the turn's events on as they are, whatever the model would say.
The real turn is tested in test_turn.py, test_serve.py and the app tests.
"""
from __future__ import annotations

import json

import pytest
from openai import OpenAI

import app.chat
import app.turn
from app.budget import Fit
from app.cli import main
from app.engine import Result
from app.tools.calling import ToolCall
from app.tui.app import CrofterApp
from app.tui.docs import SourcesPanel
from app.tui.widgets import MessageBox
from app.turn import Done, SourcesFound, TextDelta, ThinkingDelta, ToolFinished, ToolStarted
from rag.cite import Source
from rag.retrieve import Hit

from .pilot import SIZE, controller, say, start
from .serve_server import LiveServer, options

SOURCE = Source(1, Hit("notes/lamps.md", None, "Oil", 0, 40, "The lamp burns oil.", 0.9))
CALL = ToolCall("calculator", {"expression": "17 * 23"}, "ok", "391")


def script(kind: str, text: str | None) -> list:
    """The events of one turn of `kind`, as run_turn would yield them."""
    answer = {"plain": "Hello there.", "grounded": "It burns oil [1].", "tools": "17 * 23 = 391.",
              "thinking": "Blue.", "contradicts": "17 * 23 = 400."}[kind]
    events: list = []
    extra: dict = {}
    if kind == "grounded":
        events.append(SourcesFound([SOURCE]))
        extra = {"sources": [SOURCE], "cited": [SOURCE], "grounded": True}
    if kind in ("tools", "contradicts"):
        events += [ToolStarted(CALL.name, CALL.arguments), ToolFinished(CALL)]
        extra = {"calls": [CALL], "contradicts_result": kind == "contradicts"}
    if kind == "thinking":
        events += [ThinkingDelta("The user wants "), ThinkingDelta("a colour.")]
        extra = {"thinking": "The user wants a colour."}
    events += [TextDelta(answer[:5]), TextDelta(answer[5:])]
    result = Result(answer, "stop", 20, 5, 20, 0.01, 50.0, 0.1)
    fit = Fit([{"role": "user", "content": text or ""}], list(range(20)), 64, 1024)
    return events + [Done(answer, result, fit, "stop", **extra)]


@pytest.fixture
def scripted(monkeypatch):
    """run_turn replaced by the script of `kinds[0]`; the session keeps the turn like the real one."""
    kinds = ["plain"]

    def fake_run_turn(session, text, *, ground=None, tools=None, cancel=None):
        events = script(kinds[0], text)
        yield from events
        session.messages = session.messages + [{"role": "user", "content": text},
                                               {"role": "assistant", "content": events[-1].answer}]

    monkeypatch.setattr(app.turn, "run_turn", fake_run_turn)
    monkeypatch.setattr(app.chat, "run_turn", fake_run_turn)
    return kinds


KINDS = ["plain", "grounded", "tools", "thinking"]


@pytest.mark.parametrize("kind", KINDS)
def test_ask_prints_the_turn(kind, scripted, bundled_path, capsys):
    scripted[0] = kind
    flags = ["--tools", "--yes"] if kind == "tools" else []
    assert main(["ask", "q", "--model", str(bundled_path), "--n-ctx", "512", *flags]) == 0
    out, err = capsys.readouterr()
    done = script(kind, "q")[-1]
    assert out.startswith(done.answer + "\n")
    assert ("Sources:\n  [1] notes/lamps.md > Oil, chars 0-40" in out) == (kind == "grounded")
    assert ('crofter: tool calculator({"expression": "17 * 23"}) -> ok: 391' in err) == (kind == "tools")
    assert "The user wants" not in out + err  # a trace only with --show-thinking
    assert main(["ask", "q", "--model", str(bundled_path), "--n-ctx", "512", "--json", "--show-thinking", *flags]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["text"] == done.answer and obj["finish_reason"] == "stop"
    assert obj.get("thinking") == (done.thinking or None)
    assert obj.get("sources", [None])[0] == (SOURCE.as_dict() if kind == "grounded" else None)
    assert [c["result"] for c in obj.get("tool_calls", [])] == (["391"] if kind == "tools" else [])


@pytest.mark.parametrize("kind", KINDS)
async def test_the_app_shows_and_stores_the_turn(kind, scripted, engine):
    scripted[0] = kind
    ctl = controller(engine)
    app_ = CrofterApp(controller=ctl)
    async with app_.run_test(size=SIZE) as pilot:
        await start(pilot)
        ctl.tools_enabled = kind == "tools"
        await say(pilot, "q")
        done = script(kind, "q")[-1]
        stored = ctl.messages()
        shown = list(app_.query(MessageBox))
        assert [(b.role, b.message_id) for b in shown] == [(m.role, m.id) for m in stored]
        assert [m.role for m in stored] == ["user", *(["tool"] if kind == "tools" else []), "assistant"]
        assert shown[-1].content == stored[-1].content == done.answer
        assert (shown[-1].thinking, stored[-1].thinking) == ((done.thinking, done.thinking) if done.thinking else ("", None))
        assert stored[-1].sources == ([SOURCE.as_dict()] if kind == "grounded" else None)
        assert bool(app_.query(SourcesPanel)) == (kind == "grounded")
        if kind == "tools":
            assert json.loads(stored[1].content)["result"] == "391"


@pytest.mark.parametrize("kind", ["plain", "thinking"])
def test_serve_answers_with_the_turn(kind, scripted):
    scripted[0] = kind
    done = script(kind, "q")[-1]
    with LiveServer(options()) as s:
        client = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=60)
        msg = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "q"}]).choices[0].message
        assert msg.content == done.answer
        assert getattr(msg, "reasoning_content", None) == (done.thinking or None)
        chunks = list(client.chat.completions.create(model="smollm2-135m", stream=True,
                                                     messages=[{"role": "user", "content": "q"}]))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == done.answer
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == done.thinking


async def test_every_door_flags_an_answer_that_does_not_state_the_tool_result(scripted, engine, bundled_path, capsys):
    """The calculator said 391, the answer says 400: ask warns (and --json says so), the app's
    reply note says so, serve's crofter field says so."""
    from app.tui.messages import CONTRADICTS

    scripted[0] = "contradicts"
    assert main(["ask", "q", "--model", str(bundled_path), "--n-ctx", "512", "--tools", "--yes"]) == 0
    assert "warning: the answer does not state the result of calculator (391)" in capsys.readouterr().err
    assert main(["ask", "q", "--model", str(bundled_path), "--n-ctx", "512", "--tools", "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contradicts_result"] is True
    ctl = controller(engine)
    app_ = CrofterApp(controller=ctl)
    async with app_.run_test(size=SIZE) as pilot:
        await start(pilot)
        ctl.tools_enabled = True
        await say(pilot, "q")
        assert list(app_.query(MessageBox))[-1].note.endswith(CONTRADICTS)
    with LiveServer(options()) as s:
        client = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "q"}],
                                           extra_body={"crofter": {"tools": ["calculator"]}})
        assert r.model_extra["crofter"]["contradicts_result"] is True
        assert r.model_extra["crofter"]["calls"][0]["result"] == "391"
    scripted[0] = "tools"
    assert main(["ask", "q", "--model", str(bundled_path), "--n-ctx", "512", "--tools", "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contradicts_result"] is False

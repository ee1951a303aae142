"""The one turn (app/turn.py): reasoning traces split from answers, a tool step's answer
streamed out of its JSON, and the turn's events on the real model.

Reasoning runs on a GGUF built here from the bundled model with an R1-style chat template
(the template opens `<think>` for the model, as DeepSeek-R1's does); what the model writes
is forced by a grammar, so every CPU sees the same trace and answer.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app import chat_export
from app.chat import ChatController
from app.config import Settings
from app.engine import Event, Result, Sampling
from app.history import HistoryStore
from app.session import ChatSession
from app.tools.calling import ToolLoop
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry
from app.tools.schema import tool
from app.turn import (AnswerStream, Done, TextDelta, ThinkingDelta, ThinkSplit, ToolFinished, ToolStarted,
                      TurnTools, finish, opens_thinking, run_turn)
from models.registry import Registry

from .reasoning import GRAMMAR, TRACE, forced  # the r1_gguf and r1_engine fixtures: tests/app/conftest.py


def split_all(chunks, opened=False):
    s = ThinkSplit(opened)
    events = [ev for c in chunks for ev in s.feed(c)] + s.close()
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    return thinking, answer


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_a_trace_is_split_from_the_answer_whatever_the_chunking(size):
    text = "  <think>\nI should add 2 and 2.\n</think>\n\nIt is 4."
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    assert split_all(chunks) == ("\nI should add 2 and 2.\n", "It is 4.")


def test_a_prefilled_trace_and_an_unfinished_one():
    assert split_all(["reasoning...", "</thi", "nk>", "answer"], opened=True) == ("reasoning...", "answer")
    assert split_all(["still thinking when max_tokens hit </th"], opened=True) == (
        "still thinking when max_tokens hit </th", "")


def test_think_tags_after_the_start_are_the_answers_own():
    text = "Use <think> tags like <think>this</think> in HTML."
    assert split_all([text[:5], text[5:]]) == ("", text)
    assert split_all(["<", "b>bold</b>"]) == ("", "<b>bold</b>")  # a held '<' that was not a trace
    assert opens_thinking("<|im_start|>assistant\n<think>\n") and not opens_thinking("<|im_start|>assistant\n")


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_an_answer_object_streams_its_decoded_string(size):
    answer = 'Line 1\nsaid "hi" \\ tab\t é 😀 done'
    raw = json.dumps({"tool": "none", "answer": answer})  # \n, \", \\, \t, \u00e9, a surrogate pair
    stream, out = AnswerStream(), []
    for i in range(0, len(raw), size):
        out.append(stream.feed(raw[i:i + size]))
    assert "".join(out) == answer and stream.closed
    call = AnswerStream()
    assert call.feed(json.dumps({"tool": "calculator", "arguments": {"expression": "1+1"}})) == ""


def test_a_reasoning_model_thinks_apart_and_later_turns_never_see_it(r1_engine):
    session = ChatSession(r1_engine, forced(), system="Be brief.")
    events = list(session.send("Name a colour."))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.thinking == TRACE + "\n" and done.answer == "Answer: blue."
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == done.thinking
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.answer
    assert "</think>" in done.result.text  # the raw output had it all
    assert session.messages[-1] == {"role": "assistant", "content": "Answer: blue."}
    nxt = r1_engine.template.render(session.messages + [{"role": "user", "content": "Another?"}])
    assert TRACE not in nxt and "Answer: blue." in nxt


def test_the_history_stores_the_trace_apart(r1_gguf, r1_engine):
    Registry().add(r1_gguf, name="smollm2-r1")
    ctl = ChatController(HistoryStore(), Settings(temperature=0.0, max_tokens=64, n_ctx=1024),
                         loader=lambda entry, s: r1_engine)
    ctl.load_model("smollm2-r1")
    ctl.new_chat()
    ctl.session.sampling = forced()
    done = finish(ctl.send("Name a colour."))
    user, reply = ctl.messages()
    assert done.message_ids == [user.id, reply.id]
    assert (reply.content, reply.thinking) == ("Answer: blue.", TRACE + "\n")
    ctl.open_chat(ctl.chat.id)  # reopened: the model's history has the answer only
    assert ctl.session.messages[-1] == {"role": "assistant", "content": "Answer: blue."}
    assert chat_export.as_json(HistoryStore(), ctl.chat.id)["messages"][1]["thinking"] == TRACE + "\n"


def _ask(r1_gguf, tmp_path, *flags):
    grammar = tmp_path / "forced.gbnf"
    grammar.write_text(GRAMMAR)
    return subprocess.run([sys.executable, "-m", "app.cli", "ask", "Name a colour.", "--model", str(r1_gguf),
                           "--n-ctx", "1024", "-t", "0", "-n", "64", "--grammar-file", str(grammar), *flags],
                          capture_output=True, text=True, timeout=300)


def test_ask_hides_the_trace_unless_asked(r1_gguf, tmp_path):
    plain = _ask(r1_gguf, tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "Answer: blue.\n" and TRACE not in plain.stderr
    shown = _ask(r1_gguf, tmp_path, "--show-thinking")
    assert shown.stdout == "Answer: blue.\n" and TRACE in shown.stderr
    as_json = json.loads(_ask(r1_gguf, tmp_path, "--json").stdout)
    assert (as_json["text"], as_json["thinking"]) == ("Answer: blue.", TRACE + "\n")


def test_ask_refuses_a_grammar_llama_cpp_cannot_parse(r1_gguf, tmp_path):
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= undefined-rule\n")
    r = subprocess.run([sys.executable, "-m", "app.cli", "ask", "hi", "--model", str(r1_gguf), "--n-ctx", "512",
                        "--grammar-file", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "the grammar does not parse" in r.stderr  # not a segfault (139)


def test_a_tool_turn_streams_its_answer_and_reports_each_call(engine):
    reg = ToolRegistry.discover(ToolContext())
    session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=64))
    before = list(session.messages)
    events = list(run_turn(session, "What is 17 * 23? Use the calculator.",
                           tools=TurnTools(reg, Policy(), lambda *a: True, max_calls=2)))
    done = events[-1]
    assert isinstance(done, Done)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.answer
    started = [e for e in events if isinstance(e, ToolStarted)]
    finished = [e.call for e in events if isinstance(e, ToolFinished)]
    assert finished == done.calls and len(started) <= len(finished)
    assert all(c.name in reg.tools for c in finished)
    # The session keeps the user's message, each result as the model saw it, and the answer;
    # the tool instructions and raw call objects stay out of it.
    added = session.messages[len(before):]
    assert added[0] == {"role": "user", "content": "What is 17 * 23? Use the calculator."}
    assert added[-1] == {"role": "assistant", "content": done.answer}
    assert len(added) == 2 + len(done.calls)
    assert not any("You can use tools" in m["content"] for m in session.messages)


def test_a_deferred_call_is_handed_back_unrun(engine):
    """An API client runs its own tools: the loop stops at the call, runs nothing, asks nothing."""
    ran, asked = [], []

    def bump(n: int) -> str:
        """Add one to a counter."""
        ran.append(n)
        return "ok"

    reg = ToolRegistry.discover(ToolContext())
    reg.register(tool(bump), "test")
    session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=48))
    loop = ToolLoop(session, reg, Policy({"bump": "allow"}), lambda *a: asked.append(a) or True, defer=True)

    def generate(prompt_tokens, sampling, cancel=None):
        raw = json.dumps({"tool": "bump", "arguments": {"n": 7}})
        yield Event(done=Result(raw, "stop", len(prompt_tokens), 1, 0, 0.0, 0.0, 0.0))

    loop.generate = generate
    turn = loop.run("Bump 7.")
    assert (turn.finish_reason, [(c.name, c.arguments, c.status) for c in turn.calls]) == (
        "tool_calls", [("bump", {"n": 7}, "requested")])
    assert ran == [] and asked == []


def test_a_reasoning_model_thinks_before_its_tool_call(r1_engine):
    """With a template that opens <think>, the call grammar applies after </think>: the trace
    streams as thinking, the object after it is parsed as the call."""
    reg = ToolRegistry.discover(ToolContext())
    session = ChatSession(r1_engine, Sampling(temperature=0.0, max_tokens=64))
    loop = ToolLoop(session, reg, Policy(), lambda *a: True)
    assert loop.thinks and "</think>" in loop._grammar._grammar
    r1_engine.check_grammar(loop._grammar)  # llama.cpp parses the combined grammar
    r1_engine.check_grammar(loop._answer_only)
    replies = iter(["Multiply.\n</think>\n\n" + json.dumps({"tool": "calculator", "arguments": {"expression": "17 * 23"}}),
                    "It is known.</think>" + json.dumps({"tool": "none", "answer": "391"})])

    def generate(prompt_tokens, sampling, cancel=None):
        raw = next(replies)
        for i in range(0, len(raw), 4):
            yield Event(raw[i:i + 4])
        yield Event(done=Result(raw, "stop", len(prompt_tokens), 1, 0, 0.0, 0.0, 0.0))

    loop.generate = generate
    events = []
    gen = loop.events(session.messages + [{"role": "user", "content": "17 * 23?"}])
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        outcome = stop.value
    assert [(c.name, c.status, c.result) for c in outcome.turn.calls] == [("calculator", "ok", "391")]
    assert outcome.turn.answer == "391" and outcome.turn.thinking == "Multiply.\nIt is known."
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == outcome.turn.thinking
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "391"


def test_with_tools_required_the_first_step_must_call(engine):
    reg = ToolRegistry.discover(ToolContext())
    session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=256))  # room for any call object
    done = finish(run_turn(session, "Hello there!", tools=TurnTools(reg, Policy(), lambda *a: False, defer=True, require=True)))
    # A greeting needs no tool, but the grammar leaves the model no answer branch.
    assert done.finish_reason == "tool_calls" and done.calls[0].name in reg.tools and done.calls[0].status == "requested"

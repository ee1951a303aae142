"""Choosing the tool, path arguments limited to what exists, and answers that state the result.

The model's own choices are not asserted (a greedy 135M model's words change with the CPU):
the tests force the path with a grammar on the real model, check a schema's enum contents, or
check the ranking functions against a second, independent computation on the same machine.
"""
from __future__ import annotations

import json
import math
import os

import jsonschema
import pytest
from llama_cpp import LlamaGrammar

from app.engine import Event, Result, Sampling
from app.session import ChatSession
from app.tools import files
from app.tools.calling import ToolLoop
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry
from app.tools.schema import SchemaError, tool
from app.tools.step import (NO_TOOL, continuation_logprobs, example_lines, on_worker, opening, rank,
                            scored_tails, stated_answer_gbnf, states)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "sub" / "deeper").mkdir(parents=True)
    (r / "notes.txt").write_text("Buy milk.")
    (r / "sub" / "plan.md").write_text("plan")
    (r / "sub" / "deeper" / "x.csv").write_text("1,2")
    (r / ".hidden").write_text("no")
    (r / 'quote".txt').write_text("no")  # a grammar literal cannot carry it (json-schema-to-grammar mis-escapes quotes)
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", r / "link.txt")  # leads out of the root
    os.mkfifo(r / "pipe")
    return r


def test_listing_names_only_real_files_inside_the_roots(root, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("b")
    names = files.names([str(root), str(other)])
    assert names == ["notes.txt", "sub/plan.md", "sub/deeper/x.csv", str(other.resolve() / "b.txt")]
    for n in names:  # every name is one read_file accepts
        files.read_text([str(root), str(other)], n)
    assert files.names([str(root)], folders=True) == [".", "sub", "sub/deeper"]
    assert files.names([str(root)], cap=2) is None  # over the cap: the argument stays a free string
    assert files.names([]) == []


def test_read_file_path_is_an_enum_of_this_turns_files(root, engine):
    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    declared = reg.tools["read_file"].parameters
    loop = ToolLoop(ChatSession(engine, Sampling()), reg, Policy(), lambda *a: True)
    assert loop.tools["read_file"].parameters["properties"]["path"]["enum"] == ["notes.txt", "sub/plan.md", "sub/deeper/x.csv"]
    assert loop.tools["list_dir"].parameters["properties"]["path"]["enum"] == [".", "sub", "sub/deeper"]
    assert "enum" not in declared["properties"]["path"]  # the registry's tool is left as declared
    (root / "new.txt").write_text("new")  # built per turn: the next turn sees it
    again = ToolLoop(ChatSession(engine, Sampling()), reg, Policy(), lambda *a: True)
    assert "new.txt" in again.tools["read_file"].parameters["properties"]["path"]["enum"]
    plain = ToolLoop(ChatSession(engine, Sampling()), reg, Policy(), lambda *a: True, listing=False)
    assert "enum" not in plain.tools["read_file"].parameters["properties"]["path"]
    # A call from outside the grammar is checked by the tool itself, not refused as "not one of".
    call = loop._call("read_file", {"path": "../outside.txt"}, tainted=False, seen={})
    assert call.status == "error" and "outside the allowed folders" in call.result


def test_sampled_paths_always_name_an_existing_file(root, engine):
    """Hot sampling under the read_file branch: every finished call names a listed file."""
    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    listed = files.names([str(root)])
    finished = 0
    for seed in range(3):
        session = ChatSession(engine, Sampling(temperature=1.5, seed=seed, max_tokens=48))
        loop = ToolLoop(session, reg, Policy(), lambda *a: True)
        obj, raw, finish = loop.decide(session.messages + [{"role": "user", "content": "Read my plan."}], loop.branch("read_file"))
        if finish == "stop":
            assert obj["tool"] == "read_file" and obj["arguments"]["path"] in listed, raw
            finished += 1
    assert finished >= 1


def test_choices_must_name_a_str_parameter():
    def count(n: int) -> str:
        """Count."""
        return str(n)

    with pytest.raises(SchemaError, match="choices 'n': not a str parameter"):
        tool(count, choices={"n": lambda: ["1"]})


def test_generated_examples_are_valid_calls(root, engine):
    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    loop = ToolLoop(ChatSession(engine, Sampling()), reg, Policy(), lambda *a: True)
    lines = example_lines(list(loop.tools.values()))
    calls = [json.loads(line.split("  (")[0]) for line in lines[1:] if line.startswith('{"tool": "') and '"arguments"' in line]
    assert [c["tool"] for c in calls] == list(reg.tools)
    for c in calls:
        jsonschema.validate(c["arguments"], loop.tools[c["tool"]].parameters)
    assert calls[0]["arguments"] == {"expression": "12.5 * (3 + 4) / 2"}  # taken from the docstring's e.g.
    assert calls[2]["arguments"] == {"path": "notes.txt"}  # from this turn's listing
    assert "Examples of replies:" in loop.instructions
    assert "Example" not in ToolLoop(ChatSession(engine, Sampling()), reg, Policy(), lambda *a: True,
                                     examples="none").instructions


def test_trie_ranking_matches_one_batch_scoring(engine):
    """The trie (one token at a time after the cached prompt, shared openings evaluated once)
    gives each continuation the log-likelihood it gets scored alone from the same cache state:
    like with like, so to the last bits. Beside it, scored_tails (one fresh batch with logits at
    every position) takes another kernel path, whose rounding differs by CPU (tenths of a nat
    over a continuation on some): it must agree on the order and to within a nat or two, which
    still catches a token scored against the wrong position (tens of nats)."""
    llm = engine.llm
    prompt = engine.tokenize_chat([{"role": "user", "content": "What is 17 * 23?"}])
    names = ["calculator", "current_time", NO_TOOL]
    conts = [llm.tokenize(opening(n).encode(), add_bos=False, special=False) for n in names]
    on_worker(engine, lambda: continuation_logprobs(llm, prompt, conts))  # cache: the prompt less its last token
    trie = on_worker(engine, lambda: continuation_logprobs(llm, prompt, conts))
    alone = [on_worker(engine, lambda c=c: continuation_logprobs(llm, prompt, [c]))[0] for c in conts]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(trie, alone)), (trie, alone)
    batch = on_worker(engine, lambda: scored_tails(llm, [(prompt + c, len(prompt)) for c in conts]))
    order = lambda xs: sorted(range(len(xs)), key=lambda i: -xs[i])  # noqa: E731
    assert order(trie) == order(batch), (trie, batch)
    assert all(abs(a - b) < 2.0 for a, b in zip(trie, batch)), (trie, batch)
    ranked = rank(engine, prompt, names)
    assert sorted(ranked, key=lambda p: -p[1]) == ranked and {n for n, _ in ranked} == set(names)


def test_ranking_leaves_the_cache_right_for_the_next_generation(engine):
    """After a ranking the engine's greedy reply is the one it gives without it, from the same
    cache state (llama.cpp's logits differ in the last bits between a prompt evaluated whole and
    one whose prefix came from the cache, so each is compared with its like)."""
    prompt = engine.tokenize_chat([{"role": "user", "content": "Name a colour."}])
    greedy = Sampling(temperature=0.0, max_tokens=12)
    engine.reset()
    fresh = engine.complete(prompt, greedy).text
    cached = engine.complete(prompt, greedy)  # the prompt less its last token came from the cache
    rank(engine, prompt, ["calculator", NO_TOOL])  # leaves the same: the prompt less its last token
    after = engine.complete(prompt, greedy)
    assert after.text == cached.text and after.prompt_tokens_evaluated == cached.prompt_tokens_evaluated == 1
    on_worker(engine, lambda: scored_tails(engine.llm, [(prompt, 3)]))  # empties the cache
    again = engine.complete(prompt, greedy)
    assert again.text == fresh and again.prompt_tokens_evaluated == len(prompt)


def scripted(loop, replies):
    asked, it = [], iter(replies)

    def generate(prompt_tokens, sampling, cancel=None):
        asked.append(sampling.grammar)
        raw = json.dumps(next(it))
        yield Event(done=Result(raw, "stop", len(prompt_tokens), 1, 0, 0.0, 0.0, 0.0))

    loop.generate = generate
    return asked


@pytest.mark.parametrize("choose", ["rank", "channel", "decide"])
def test_the_chosen_tool_is_the_only_branch_of_the_first_step(engine, monkeypatch, choose):
    import app.tools.calling as calling

    reg = ToolRegistry.discover(ToolContext())
    loop = ToolLoop(ChatSession(engine, Sampling(temperature=0.0, max_tokens=32)), reg, Policy(), lambda *a: True,
                    choose=choose)
    picks = iter(["current_time", NO_TOOL])
    fake = lambda *a, **k: [(next(picks), -1.0), ("calculator", -2.0)]  # noqa: E731
    monkeypatch.setattr(calling, "rank", fake)
    monkeypatch.setattr(calling, "rank_channel", fake)
    monkeypatch.setattr(calling, "decide_name", lambda *a, **k: next(picks))
    msgs = loop.scaffold([{"role": "user", "content": "q"}])
    grammar, choice = loop.choose_first(msgs)
    assert grammar is loop.branch("current_time") and choice[0][0] == "current_time"
    assert '"\\"current_time\\""' in grammar._grammar and "calculator" not in grammar._grammar
    grammar, _ = loop.choose_first(msgs)
    assert grammar is loop._answer_only


def test_a_result_that_is_the_answer_begins_the_answer(engine):
    """After an ok calculator call the next step's grammar starts the answer with the result;
    the real model, sampled hot under it, always states it."""
    reg = ToolRegistry.discover(ToolContext())
    loop = ToolLoop(ChatSession(engine, Sampling(temperature=0.0, max_tokens=32)), reg, Policy(), lambda *a: True,
                    choose="sample")
    asked = scripted(loop, [{"tool": "calculator", "arguments": {"expression": "17 * 23"}},
                            {"tool": "none", "answer": "It is 400."}])
    turn = loop.run("What is 17 * 23?")
    assert asked[0] is loop._grammar and '"\\"" "391" "\\""' in asked[1]._grammar
    assert turn.contradicts_result  # the scripted answer ignored the grammar and the result
    for seed in range(3):
        session = ChatSession(engine, Sampling(temperature=1.5, seed=seed, max_tokens=24))
        hot = ToolLoop(session, reg, Policy(), lambda *a: True)
        obj, raw, finish = hot.decide(session.messages + [{"role": "user", "content": "17 * 23?"}], asked[1])
        assert raw.replace(" ", "").startswith('{"tool":"none","answer":"391'), raw
        if finish == "stop":
            assert obj["answer"] == "391"


def test_the_turn_carries_an_answer_that_contradicts_the_result(engine, monkeypatch):
    """run_turn's Done says when the answer leaves out the calculator's result (the front doors
    flag it; test_front_doors.py checks what each shows)."""
    from app.turn import TurnTools, finish, run_turn

    replies = iter([{"tool": "calculator", "arguments": {"expression": "17 * 23"}}, {"tool": "none", "answer": "It is 400."},
                    {"tool": "calculator", "arguments": {"expression": "2 + 2"}}, {"tool": "none", "answer": "It is 4."}])

    def generate(self, prompt_tokens, sampling, cancel=None):
        raw = json.dumps(next(replies))
        yield Event(done=Result(raw, "stop", len(prompt_tokens), 1, 0, 0.0, 0.0, 0.0))

    monkeypatch.setattr(ToolLoop, "generate", generate)
    reg = ToolRegistry.discover(ToolContext())
    session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=32))
    uses = dict(tools=TurnTools(reg, Policy(), lambda *a: True))
    wrong = finish(run_turn(session, "What is 17 * 23?", **uses))
    assert wrong.calls[0].result == "391" and wrong.contradicts_result
    right = finish(run_turn(session, "What is 2 + 2?", **uses))
    assert right.calls[0].result == "4" and not right.contradicts_result


@pytest.mark.parametrize("result,more", [('say "hi"\\now', False), ("2026-12-01T21:09:12+00:00", True),
                                         ("line\nnext\ttab", False)])
def test_stated_grammar_carries_any_result(engine, result, more):
    grammar = LlamaGrammar.from_string(stated_answer_gbnf(result, more), verbose=False)
    engine.check_grammar(grammar)  # llama.cpp parses it
    session = ChatSession(engine, Sampling(temperature=0.0, max_tokens=40))
    loop = ToolLoop(session, ToolRegistry.discover(ToolContext()), Policy(), lambda *a: True)
    obj, raw, finish = loop.decide(session.messages + [{"role": "user", "content": "?"}], grammar)
    prefix = raw.split('"answer"', 1)[1].split('"', 1)[1]
    assert json.loads('"' + prefix[:len(json.dumps(result)) - 2] + '"') == result, raw
    if not more and finish == "stop":
        assert obj["answer"] == result


def test_states_compares_numbers_by_value():
    assert states("17 * 23 = 391.", "391") and states("It is 391.0", "391") and states("about 1,728", "1728")
    assert not states("It is 400.", "391") and not states("", "391")
    assert states("The time is 2026-12-01T21:09:12+00:00", "2026-12-01T21:09:12+00:00")


def test_a_named_file_is_the_only_one_the_call_may_name(root, engine):
    from app.tools.step import mentioned

    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    loop = ToolLoop(ChatSession(engine, Sampling()), reg, Policy(), lambda *a: True)
    read = loop.tools["read_file"]
    assert mentioned(read, "What does plan.md say?").parameters["properties"]["path"]["enum"] == ["sub/plan.md"]
    assert mentioned(read, "Read NOTES.TXT and x.csv.").parameters["properties"]["path"]["enum"] == ["notes.txt", "sub/deeper/x.csv"]
    assert mentioned(read, "Read my file.") is read  # nothing named: every listed file stays
    assert mentioned(read, "notes.txtx") is read
    grammar = loop.branch("read_file", "Open plan.md")
    assert '"\\"sub/plan.md\\""' in grammar._grammar and "notes.txt" not in grammar._grammar


def test_named_in_matches_a_file_name_as_a_word_of_its_own():
    assert files.named_in("Read notes.txt.", "notes.txt") and files.named_in("open NOTES.TXT?", "notes.txt")
    assert files.named_in("What does sub/plan.md say", "sub/plan.md") and files.named_in("Read plan.md", "sub/plan.md")
    assert not files.named_in("Read my_notes.txt", "notes.txt") and not files.named_in("notes.txt.bak", "notes.txt")
    assert not files.named_in("notes.txtx", "notes.txt") and not files.named_in("Read it", ".")
    assert files.asks_for("What's in todo.txt?", files.READ_WORDS) and not files.asks_for("Reader", files.READ_WORDS)


def test_a_regenerated_turn_is_judged_by_what_the_user_wrote(tmp_path, engine):
    """With no new text (regenerate), the message is the last user entry that is not a tool result."""
    root = tmp_path / "plain"
    root.mkdir()
    (root / "notes.txt").write_text("Buy milk.")
    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    loop = ToolLoop(ChatSession(engine, Sampling(temperature=0.0, max_tokens=32)), reg, Policy(), lambda *a: True,
                    choose="sample")
    asked = scripted(loop, [{"tool": "read_file", "arguments": {"path": "notes.txt"}}, {"tool": "none", "answer": "x"}])
    history = [{"role": "user", "content": "Read notes.txt."}, {"role": "assistant", "content": "{}"},
               {"role": "user", "content": "Tool result (list_dir, ok):\nnotes.txt"}]
    gen = loop.events(history)
    while True:
        try:
            next(gen)
        except StopIteration:
            break
    assert loop.message == "Read notes.txt." and "Buy milk." in asked[1]._grammar


@pytest.mark.parametrize("message,call,stated", [
    ("Read notes.txt and tell me what it says.", ("read_file", {"path": "notes.txt"}), "Buy milk."),
    ("Summarise my shopping note.", ("read_file", {"path": "notes.txt"}), None),  # the file was not named
    ("Read notes.txt and todo.txt.", ("read_file", {"path": "notes.txt"}), None),  # the other one is still to read
    ("Summarise notes.txt.", ("read_file", {"path": "notes.txt"}), None),  # asks for more than the text
    ("Read notes.txt and add up the prices.", ("read_file", {"path": "notes.txt"}), None),
    ("What files do I have?", ("list_dir", {"path": "."}), "notes.txt\ntodo.txt"),
    ("What does my shopping note say?", ("list_dir", {"path": "."}), None),  # a step towards reading it
    ("Which of my files mention the dentist?", ("list_dir", {"path": "."}), None),
    ("Is notes.txt there? List the folder.", ("list_dir", {"path": "."}), None),  # about a named file
])
def test_a_file_result_answers_the_message_that_asked_for_it(tmp_path, engine, message, call, stated):
    """After reading the file the user named (or listing the folder for a message that names no
    file) the answer is that result; otherwise the model may call again and answers in its words."""
    root = tmp_path / "plain"
    root.mkdir()
    (root / "notes.txt").write_text("Buy milk.")
    (root / "todo.txt").write_text("Call the dentist.")
    reg = ToolRegistry.discover(ToolContext(roots=[str(root)]))
    loop = ToolLoop(ChatSession(engine, Sampling(temperature=0.0, max_tokens=32)), reg, Policy(), lambda *a: True,
                    choose="sample")
    asked = scripted(loop, [{"tool": call[0], "arguments": call[1]}, {"tool": "none", "answer": "Something else."}])
    turn = loop.run(message)
    assert turn.calls[0].status == "ok"
    if stated is None:
        assert asked[1] is loop._grammar  # free to call again or answer
    else:
        assert turn.calls[0].result == stated and json.dumps(stated)[1:-1].replace("\\", "\\\\") in asked[1]._grammar
        assert turn.contradicts_result  # the scripted answer left the result out


def test_a_broken_answers_predicate_only_loses_the_shortcut():
    def probe(x: str) -> str:
        """Echo."""
        return x

    def broken(args, message):
        raise RuntimeError("boom")

    assert tool(probe, answers=broken).answers_call({"x": "a"}, "m") is False
    assert tool(probe, answers=lambda a, m: a["x"] in m).answers_call({"x": "a"}, "a b") is True
    assert tool(probe, answers=True).answers_call({}, "") and not tool(probe).answers_call({}, "")

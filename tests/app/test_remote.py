"""Remote models (app/remote.py): a real `crofter serve` on loopback is the remote, registered with
`crofter models add-remote`; the chat app's controller, `ask`, tools and documents then run on it.

No assertion reads the words of an unconstrained generation: the remote's text is compared like
with like (the same prompt, settings and fresh KV cache through the local engine), or forced by
a grammar that travels to the server (as GBNF `grammar`, or the tool loop's JSON schema as
`response_format`). Faults are real: a port nothing listens on, a socket that never answers, a
proxy that cuts the stream mid-reply, the server stopped under a loaded model.
"""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import httpx
import jsonschema
import pytest
from llama_cpp import LlamaGrammar

from app.chat import ChatController
from app.cli import main
from app.config import Settings
from app.engine import EngineError, Sampling
from app.history import HistoryStore
from app.remote import RemoteEngine, RemotePrompt, check_server
from app.session import ChatSession
from app.tools.policy import Policy
from app.tools.registry import ToolContext, ToolRegistry
from app.turn import Done, SourcesFound, TextDelta, TurnTools, finish, run_turn
from models.registry import Registry

from .cutting_proxy import CuttingProxy
from .serve_server import LiveServer, free_socket, options

MODEL = "smollm2-135m"
# A fixed reply of hundreds of tokens: the stream cannot end before the cut (or the cancel) comes.
LALA_TEXT = "la" + " la" * 300
LALA = LlamaGrammar.from_string(f'root ::= "{LALA_TEXT}"', verbose=False)


@pytest.fixture(scope="module")
def server():
    with LiveServer(options(models=[MODEL], queue=16)) as s:
        yield s


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def add(capsys, url, name="far", *extra):
    rc, out, err = cli(capsys, "models", "add-remote", name, "--base-url", url, *extra)
    assert rc == 0, err
    return out


def controller(**settings):
    base = {"temperature": 0.0, "seed": 1, "max_tokens": 24}
    return ChatController(HistoryStore(), Settings(**{**base, **settings}))


def dead_url() -> str:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


# -- registration -----------------------------------------------------------------------------------
def test_add_remote_checks_the_server_then_lists_shows_and_removes_it(server, capsys, crofter_home):
    out = add(capsys, server.url, "far", "--n-ctx", "1024")
    assert "far (remote): smollm2-135m" in out  # the embedder crofter serve lists is not picked
    rc, out, _ = cli(capsys, "models", "list", "--json")
    row = next(r for r in json.loads(out) if r["name"] == "far")
    assert (row["kind"], row["base_url"], row["model"], row["context_length"]) == ("remote", server.url, MODEL, 1024)
    rc, out, _ = cli(capsys, "models", "list")
    assert rc == 0 and "remote" in out and "far" in out
    rc, out, _ = cli(capsys, "models", "info", "far", "--json")
    assert rc == 0 and json.loads(out)["base_url"] == server.url
    rc, out, _ = cli(capsys, "models", "rm", "far")
    assert rc == 0 and "removed far" in out
    assert "far" not in {e.name for e in Registry().entries()}


def test_registration_refuses_bad_fields_and_an_unknown_model_in_one_line(server, capsys):
    for argv, needle in ((["--base-url", "gpu-box:8000"], "--base-url 'gpu-box:8000': not an http(s) URL"),
                         (["--base-url", server.url, "--api-key-env", "NOT-A-VAR"], "--api-key-env 'NOT-A-VAR'"),
                         (["--base-url", server.url, "--model", "nope"], "has no model 'nope' (it offers: smollm2-135m")):
        rc, _, err = cli(capsys, "models", "add-remote", "far", *argv)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert "far" not in {e.name for e in Registry().entries()}


def test_a_server_that_is_down_is_one_line_and_registers_nothing_unless_no_check(capsys):
    url = dead_url()
    rc, _, err = cli(capsys, "models", "add-remote", "far", "--base-url", url, "--model", "m")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"crofter: error: cannot reach {url}: "), err
    assert "refused" in lines[0] and lines[0].endswith("is the server running?")
    assert "far" not in {e.name for e in Registry().entries()}
    add(capsys, url, "far", "--model", "m", "--no-check")  # registered without contacting anyone
    rc, out, err = cli(capsys, "ask", "--model", "far", "Hello?")
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1 and f"cannot reach {url}" in err
    with pytest.raises(EngineError, match="cannot reach"):
        controller().load_model("far")


# -- ask -------------------------------------------------------------------------------------------
def test_ask_on_the_remote_streams_the_local_engines_text(capsys, crofter_home):
    """Like with like: a fresh server (no KV cache to reuse) and a fresh local engine, the same
    model, window, thread count, prompt and greedy settings: the same words."""
    flags = ["--temperature", "0", "--seed", "7", "--max-tokens", "16", "Name three colours."]
    with LiveServer(options(models=[MODEL])) as s:
        add(capsys, s.url)
        rc, remote, err = cli(capsys, "ask", "--model", "far", *flags)
        assert rc == 0, err
    rc, local, err = cli(capsys, "ask", "--model", MODEL, "--n-ctx", "1024", "--threads", "1", *flags)
    assert rc == 0, err
    assert remote.strip() and remote == local


def test_ask_sends_a_grammar_file_to_the_remote(server, capsys, tmp_path):
    add(capsys, server.url)
    gbnf = tmp_path / "city.gbnf"
    gbnf.write_text('root ::= "The capital is " ("Paris" | "Rome") "."\n')
    rc, out, err = cli(capsys, "ask", "--model", "far", "--grammar-file", str(gbnf), "--json", "Capital of France?")
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["text"] in ("The capital is Paris.", "The capital is Rome.")
    assert obj["usage"]["prompt_tokens"] > 10  # the server's own count came back


# -- the chat app's controller ----------------------------------------------------------------------
def test_the_controller_runs_and_stores_a_turn_on_the_remote(server, capsys):
    add(capsys, server.url, "far", "--n-ctx", "1024")
    ctl = controller()
    ctl.load_model("far")
    assert isinstance(ctl.engine, RemoteEngine) and ctl.engine.n_ctx == 1024
    events = list(ctl.send("Say hello."))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason in ("stop", "length")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.answer != ""
    stored = ctl.store.messages(ctl.chat.id)
    assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert stored[1].content == done.answer and stored[1].model == "far"
    assert stored[1].prompt_tokens == done.result.prompt_tokens > 5  # usage from the server
    assert stored[0].id in done.message_ids and stored[1].id in done.message_ids
    meter = ctl.context_meter("and then?")  # the context meter works on the estimate
    assert meter.n_ctx == 1024 and 0 < meter.used < 1024


def test_a_tool_turn_on_the_remote_makes_well_formed_calls(server):
    """tools required: the first step's grammar (sent as the JSON schema) admits only calls, so
    a real call comes back whatever the model prefers; its shape is all that is asserted."""
    eng = RemoteEngine.connect(Registry().remote_entry("far", server.url, MODEL, n_ctx=1024))
    try:
        registry = ToolRegistry.discover(ToolContext())
        session = ChatSession(eng, Sampling(temperature=0.0, seed=1, max_tokens=48))
        tools = TurnTools(registry, Policy(), lambda *a: True, max_calls=1, require=True)
        done = finish(run_turn(session, "What is 17 * 23? Use the calculator.", tools=tools))
    finally:
        eng.close()
    assert done.calls, done
    call = done.calls[0]
    assert call.name in registry.tools
    jsonschema.validate(call.arguments, registry.tools[call.name].parameters)
    assert call.status in ("ok", "error", "denied")  # it was run (or refused) locally, never invented


def test_a_grounded_turn_on_the_remote_cites_a_retrieved_source(server, tmp_path):
    from app import documents

    doc = tmp_path / "lighthouse.md"
    doc.write_text("# Keepers\n\nThe Skerry lighthouse keeper in 1901 was Morag Lindqvist; she kept the lamp for 30 years.\n")
    settings = Settings(temperature=0.0, seed=1, max_tokens=24)
    with documents.open_store(settings) as store:
        documents.ingestor(store, settings, "notes").run([str(doc)], "notes")
        search = documents.collection_search(store, settings, ["notes"])
        eng = RemoteEngine.connect(Registry().remote_entry("far", server.url, MODEL, n_ctx=1024))
        try:  # the answer is forced to cite [1]; retrieval and citing are the real ones
            grammar = LlamaGrammar.from_string('root ::= "Morag Lindqvist kept it [1]."', verbose=False)
            session = ChatSession(eng, Sampling(temperature=0.0, max_tokens=24, grammar=grammar))
            events = list(run_turn(session, "Who kept the Skerry lighthouse in 1901?", ground=documents.grounder(search, 3)))
        finally:
            eng.close()
    done = events[-1]
    assert isinstance(events[0], SourcesFound) and [s.as_dict()["source"] for s in events[0].sources] == [str(doc)]
    assert done.grounded and done.answer == "Morag Lindqvist kept it [1]."
    assert [(s.n, s.as_dict()["source"]) for s in done.cited] == [(1, str(doc))]
    assert done.result.prompt_tokens > 40  # the server saw the passage, not only the question
    assert session.messages[-2]["content"] == "Who kept the Skerry lighthouse in 1901?"  # history: the question only


def test_a_remote_reasoning_trace_comes_back_as_thinking_apart_from_the_answer(r1_gguf, crofter_home):
    """The remote (crofter serve over an R1-style GGUF) sends its trace as reasoning_content;
    here it becomes thinking again, and the history keeps the answer only."""
    from .reasoning import GRAMMAR, TRACE

    Registry().add(r1_gguf, name="smollm2-r1")
    with LiveServer(options(models=["smollm2-r1"])) as s:
        eng = RemoteEngine.connect(Registry().remote_entry("far-r1", s.url, "smollm2-r1", n_ctx=1024))
        try:
            grammar = LlamaGrammar.from_string(GRAMMAR, verbose=False)
            session = ChatSession(eng, Sampling(temperature=0.0, max_tokens=64, grammar=grammar))
            done = finish(run_turn(session, "Name a colour."))
        finally:
            eng.close()
    assert done.thinking.strip() == TRACE and done.answer == "Answer: blue."
    assert session.messages[-1] == {"role": "assistant", "content": "Answer: blue."}


# -- keys -------------------------------------------------------------------------------------------
def test_the_key_comes_from_the_env_var_and_a_missing_one_is_a_one_line_401(capsys, monkeypatch, crofter_home):
    with LiveServer(options(models=[MODEL], api_key="s3cret")) as s:
        rc, _, err = cli(capsys, "models", "add-remote", "far", "--base-url", s.url)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "HTTP 401" in err and "--api-key-env" in err, err
        monkeypatch.setenv("CROFTER_TEST_KEY", "s3cret")
        add(capsys, s.url, "far", "--api-key-env", "CROFTER_TEST_KEY")
        assert "s3cret" not in (crofter_home / "models.json").read_text()  # the name of the variable only
        rc, out, err = cli(capsys, "ask", "--model", "far", "--max-tokens", "4", "Hi")
        assert rc == 0 and out.strip(), err
        monkeypatch.delenv("CROFTER_TEST_KEY")
        rc, out, err = cli(capsys, "ask", "--model", "far", "--max-tokens", "4", "Hi")
    lines = err.strip().splitlines()
    assert rc == 1 and out == "" and len(lines) == 1, err
    assert "HTTP 401" in lines[0] and s.url in lines[0] and "$CROFTER_TEST_KEY, which is not set" in lines[0]


# -- faults -----------------------------------------------------------------------------------------
def test_a_server_that_never_answers_times_out_in_one_line():
    sock = free_socket()  # listens, never accepts: the request waits forever
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        with pytest.raises(EngineError, match=f"^{url}: no answer in time"):
            check_server(url, timeout=0.5)
        eng = RemoteEngine(url, "m", n_ctx=512, read_timeout=0.5)
        prompt = eng.tokenize_chat([{"role": "user", "content": "hi"}])
        with pytest.raises(EngineError, match=f"^{url}: no answer in time"):
            list(eng.stream(prompt, Sampling(max_tokens=4)))
        eng.close()
    finally:
        sock.close()


def test_the_server_stopping_under_a_loaded_model_fails_the_turn_and_stores_no_reply(capsys, crofter_home):
    with LiveServer(options(models=[MODEL])) as s:
        add(capsys, s.url)
        ctl = controller()
        ctl.load_model("far")
    with pytest.raises(EngineError, match=f"cannot reach {s.url}"):
        list(ctl.send("Hello?"))
    assert [m.role for m in ctl.store.messages(ctl.chat.id)] == ["user"]  # stored before generation; no reply
    assert ctl.session.messages == []  # the session's history is as it was


def test_a_stream_cut_mid_reply_keeps_the_partial_reply_marked_incomplete(server):
    proxy = CuttingProxy(server.port, events=6)  # the opening chunk and five of text
    try:
        Registry().add_remote("cut", proxy.url, MODEL, n_ctx=1024)
        ctl = controller(max_tokens=320)
        ctl.load_model("cut")
        ctl.new_chat()
        ctl.session.sampling = replace(ctl.session.sampling, grammar=LALA)
        seen = len(server.app.state.finishes.items)
        events = list(ctl.send("Sing."))
    finally:
        proxy.close()
    done = events[-1]
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert done.finish_reason == "error"
    assert streamed and streamed == done.answer and streamed.startswith("la")
    assert LALA_TEXT.startswith(done.answer) and len(done.answer) < len(LALA_TEXT)  # cut short
    stored = ctl.store.messages(ctl.chat.id)
    assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "incomplete")]
    assert stored[1].content == done.answer
    finishes = server.app.state.finishes  # the server saw its client go, and stopped generating
    with finishes.changed:
        assert finishes.changed.wait_for(lambda: len(finishes.items) > seen, timeout=60)
    assert finishes.items[-1]["finish_reason"] == "cancelled"


def test_ask_says_when_a_remote_stream_was_cut(server, capsys, tmp_path):
    grammar = tmp_path / "lala.gbnf"
    grammar.write_text(f'root ::= "{LALA_TEXT}"')
    proxy = CuttingProxy(server.port, events=6)
    try:
        Registry().add_remote("cut", proxy.url, MODEL, n_ctx=1024)
        rc, out, err = cli(capsys, "ask", "Sing.", "--model", "cut", "-n", "320", "--grammar-file", str(grammar))
    finally:
        proxy.close()
    assert rc == 0 and out.startswith("la") and len(out) < len(LALA_TEXT)  # what came is printed
    assert "the reply is incomplete: cut's server stopped sending" in err


def test_a_cancel_mid_reply_stops_the_remote_and_keeps_the_partial_reply(server, capsys):
    add(capsys, server.url, "far", "--n-ctx", "1024")
    ctl = controller(max_tokens=320)
    ctl.load_model("far")
    ctl.new_chat()
    ctl.session.sampling = replace(ctl.session.sampling, grammar=LALA)
    cancel = threading.Event()
    events = []
    for ev in ctl.send("Sing.", cancel):
        events.append(ev)
        if isinstance(ev, TextDelta) and len(events) >= 3:
            cancel.set()
    done = events[-1]
    assert done.finish_reason == "cancelled" and done.answer and len(done.answer) < len(LALA_TEXT)
    assert LALA_TEXT.startswith(done.answer)
    assert [m.status for m in ctl.store.messages(ctl.chat.id)] == ["complete", "incomplete"]
    ctl.update_settings(max_tokens=8)  # (and no grammar)
    after = list(ctl.send("Hi"))[-1]  # the server's model is free for the next turn
    assert after.finish_reason in ("stop", "length")


# -- the budget without a tokenizer ------------------------------------------------------------------
def test_the_budget_drops_old_turns_on_the_estimate():
    eng = RemoteEngine("http://127.0.0.1:9/v1", "m", n_ctx=256)  # nothing is contacted to fit
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        history += [{"role": "user", "content": f"question {i} " + "x" * 100},
                    {"role": "assistant", "content": f"answer {i} " + "y" * 100}]
    history.append({"role": "user", "content": "last"})
    fit = ChatSession(eng, Sampling(max_tokens=32)).fit(history)
    assert isinstance(fit.prompt_tokens, RemotePrompt)
    assert fit.dropped and fit.describe_dropped().startswith("context full")
    assert fit.messages[0]["content"] == "Be brief." and fit.messages[-1]["content"] == "last"
    assert len(fit.prompt_tokens) + fit.reserve <= 256
    with pytest.raises(EngineError, match="no tokenizer here"):
        eng.tokenize("hi")
    with pytest.raises(EngineError, match="takes messages"):
        list(eng.stream([1, 2, 3], Sampling()))
    eng.close()


def test_the_estimate_learns_from_a_server_count_above_it():
    eng = RemoteEngine("http://127.0.0.1:9/v1", "m")
    prompt = eng.tokenize_chat([{"role": "user", "content": "z" * 350}])
    assert len(prompt) == 100 + 5 + 1
    eng._learn(prompt, 50)  # the server counted fewer: the estimate stays (it only left room)
    assert eng.chars_per_token == 3.5
    eng._learn(prompt, 206)  # more: 350 characters were 200 tokens, the ratio drops below 1.75
    assert eng.chars_per_token == pytest.approx(0.95 * 350 / 200)
    assert len(eng.tokenize_chat(prompt.messages)) >= 206
    eng.close()


# -- crofter serve's `grammar` field (what the remote engine sends) ------------------------------------
def test_serve_takes_a_gbnf_grammar_field_and_refuses_a_bad_one(server):
    def post(**kw):
        return httpx.post(server.url + "/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8, **kw})

    ok = post(grammar='root ::= "Paris"')
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Paris"
    bad = post(grammar="root ::= (")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grammar"
    both = post(grammar='root ::= "x"', response_format={"type": "json_object"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "grammar"


async def test_the_app_model_picker_offers_a_remote_model_and_chats_on_it(server, capsys):
    """Ctrl+O lists the server's model next to the GGUFs; choosing it, the next reply comes from it."""
    from app.tui.app import CrofterApp
    from app.tui.screens import ModelPicker

    from .pilot import SIZE, boxes, say, screen_text, start, wait_for

    add(capsys, server.url, "far")
    ctl = controller()
    app = CrofterApp(controller=ctl)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPicker))
        await wait_for(pilot, lambda: "far" in screen_text(app) and "remote" in screen_text(app), timeout=10)
        app.screen.dismiss("far")
        await wait_for(pilot, lambda: ctl.model is not None and ctl.model.name == "far" and app.ready)
        await say(pilot, "Say hello.")
        stored = ctl.store.messages(ctl.chat.id)
        assert stored[-1].role == "assistant" and stored[-1].model == "far" and boxes(app)[-1][1] == stored[-1].content

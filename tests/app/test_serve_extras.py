"""`crofter serve`, the parts past the basics: chat `logprobs` (read from llama.cpp's logits as
each token is sampled), crofter's own tools run by the server (`crofter.tools`, under its
policy), and remote models relayed to their server. Real engine, real `openai` client, real
uvicorn on loopback; the words of free generations are only compared like with like."""
from __future__ import annotations

import math

import httpx
import pytest
from openai import OpenAI

from .serve_server import LiveServer, options

MODEL = "smollm2-135m"
GREEDY = dict(temperature=0, seed=1, max_tokens=12)

# A plugin tool with a side effect: it writes a file. The server may run it only if told to.
NOTE_TOOL = '''
from pathlib import Path
from app.tools.schema import tool

def provide(ctx):
    def write_note(text: str) -> str:
        """Write a note to the notes file.

        Args:
            text: the note
        """
        Path(__file__).with_name("notes.txt").write_text(text)
        return "written"
    return [tool(write_note, side_effects=True)]
'''


@pytest.fixture(scope="module")
def server():
    with LiveServer(options(models=[MODEL])) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _settings(**kw):
    from app.config import Settings

    return Settings(**{"temperature": 0.0, "seed": 1, "max_tokens": 32, **kw})


def chat(client, content="Name three colours.", **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **{**GREEDY, **kw})


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/chat/completions", json={"model": MODEL, **body}, timeout=120)


# -- logprobs ---------------------------------------------------------------------------------------
def test_engine_logprobs_are_the_logits_each_token_was_sampled_from(engine, raw_llm):
    """Like with like: plain llama-cpp-python evaluating the same tokens in the same batches
    (the prompt, then one token at a time) gives the same log-softmax rows."""
    import numpy as np

    from app.engine import Sampling

    prompt = engine.tokenize_chat([{"role": "user", "content": "Count to five."}])
    engine.reset()
    result = engine.complete(prompt, Sampling(temperature=0, repeat_penalty=1.0, max_tokens=10, logprobs=3))
    items = result.logprobs
    assert len(items) == result.completion_tokens > 0  # (an end token may come before the 10th)
    assert b"".join(i.token for i in items).decode("utf-8", errors="replace") == result.text
    for i in items:
        assert len(i.top) == 3 and [lp for _, lp in i.top] == sorted((lp for _, lp in i.top), reverse=True)
        assert i.token == i.top[0][0] and math.isclose(i.logprob, i.top[0][1], abs_tol=1e-9)  # greedy: the best one
    raw_llm.reset()
    raw_llm.eval(prompt)
    for i in items:
        row = np.ctypeslib.as_array(raw_llm._ctx.get_logits_ith(-1), shape=(raw_llm.n_vocab(),)).astype(np.float64)
        m = row.max()
        logp = row - m - np.log(np.exp(row - m).sum())
        best = int(np.argmax(logp))
        assert raw_llm.detokenize([best]) == i.token and abs(float(logp[best]) - i.logprob) < 1e-4
        raw_llm.eval([best])


def test_within_keeps_the_answer_tokens_only():
    from app.logprobs import TokenLogprob, within

    items = [TokenLogprob(b, -0.1) for b in (b"<think>", b"hm", b"</think>", b"\n", b"Hi", b" there", b"STOP")]
    text = "<think>hm</think>\nHi there"  # "STOP" was a stop sequence, cut from the text
    start = text.index("Hi")
    assert [i.token for i in within(items, start, len(text))] == [b"Hi", b" there"]
    glued = [TokenLogprob(b, -0.1) for b in (b"<think>", b"hm", b"</think>", b" Yes", b".")]
    text = "<think>hm</think> Yes."  # the split drops the space: the answer is "Yes."
    assert [i.token for i in within(glued, text.index("Yes"), len(text))] == [b" Yes", b"."]
    split = [TokenLogprob(b"\xc3", -1.0), TokenLogprob(b"\xa9t\xc3", -1.0), TokenLogprob(b"\xa9", -1.0)]  # "été"
    assert len(within(split, 0, 3)) == 3 and len(within(split, 1, 3)) == 2  # the 2nd token ("ét") reaches "t"
    assert len(within(split, 2, 3)) == 1


def test_chat_logprobs_cover_the_answer_streamed_and_not(client):
    chat(client, logprobs=True, top_logprobs=2)  # the cache now holds this prompt: the next two start alike
    r = chat(client, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and bytes(b for c in content for b in c.bytes).decode() == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    stream = list(chat(client, logprobs=True, top_logprobs=2, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    last = [ch for ch in stream if ch.choices and ch.choices[0].finish_reason][-1]
    streamed = last.choices[0].logprobs.content
    assert text == r.choices[0].message.content  # greedy, same server: the same reply
    assert [c.token for c in streamed] == [c.token for c in content]
    assert chat(client).choices[0].logprobs is None  # only when asked


@pytest.mark.parametrize("body, field", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "logprobs"),
    ({"logprobs": True, "crofter": {"tools": ["calculator"]}}, "logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"crofter": {"tools": ["no_such_tool"]}}, "crofter.tools"),
    ({"crofter": {"tools": ["calculator"]}, "tool_choice": {"type": "function", "function": {"name": "current_time"}}}, "tool_choice"),
])
def test_bad_logprob_and_tool_requests_are_400_naming_the_field(server, body, field):
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


# -- crofter's own tools ------------------------------------------------------------------------------
def test_a_required_calculator_call_runs_on_the_server_and_is_reported(client):
    """The call is forced (tool_choice required), the expression constrained by the calculator's
    grammar; what the server ran is checked against the calculator itself."""
    from app.tools import calc

    r = chat(client, "What is 1234 * 5678?", max_tokens=48, tool_choice="required",
             extra_body={"crofter": {"tools": ["calculator"]}})
    calls = r.model_extra["crofter"]["calls"]
    assert calls[0]["name"] == "calculator"
    try:  # whatever the model wrote, the server reports what the calculator itself gives
        want = ("ok", str(calc.calculate(calls[0]["arguments"]["expression"])))
    except Exception as exc:
        want = ("error", f"{type(exc).__name__}: {exc}")
    assert (calls[0]["status"], calls[0]["result"]) == want
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    stream = list(chat(client, "What is 1234 * 5678?", max_tokens=48, tool_choice="required", stream=True,
                       extra_body={"crofter": {"tools": ["calculator"]}}))
    ran = [ch.model_extra["crofter"]["call"] for ch in stream if (ch.model_extra or {}).get("crofter", {}).get("call")]
    assert ran and ran[0]["name"] == "calculator"
    final = [ch for ch in stream if ch.choices and ch.choices[0].finish_reason][-1]
    assert final.model_extra["crofter"]["calls"] == ran


def test_a_tool_with_side_effects_runs_only_when_the_server_allows_it(crofter_home):
    tools = crofter_home / "tools"
    tools.mkdir(parents=True)
    (tools / "note.py").write_text(NOTE_TOOL)
    body = {"messages": [{"role": "user", "content": "Note: buy milk."}], "max_tokens": 48, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "write_note"}}, "crofter": {"tools": ["write_note"]}}
    with LiveServer(options(models=[MODEL])) as s:
        r = post(s, body)
    assert r.status_code == 200, r.text
    statuses = [c["status"] for c in r.json()["crofter"]["calls"]]
    assert statuses[0] == "denied" and set(statuses) <= {"denied", "repeated"}
    assert not (tools / "notes.txt").exists()
    with LiveServer(options(models=[MODEL], allow_tools=["write_note"])) as s:
        r = post(s, body)
    calls = r.json()["crofter"]["calls"]
    ok = [c for c in calls if c["status"] == "ok"]
    assert calls[0]["status"] == "ok" and ok[0]["result"] == "written"
    assert (tools / "notes.txt").read_text() == ok[-1]["arguments"]["text"]


def test_serve_refuses_an_unknown_allow_tool_in_one_line(capsys):
    from app.cli import main

    assert main(["serve", "--allow-tool", "nope", "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert "--allow-tool nope: no such tool" in err and "calculator" in err and len(err.strip().splitlines()) == 1


# -- remote models ------------------------------------------------------------------------------------
def test_a_remote_model_is_offered_and_relayed_to_its_server(crofter_home):
    """A crofter serve whose store has a remote model pointing at another crofter serve lists
    it, answers a chat through it with the words a fresh server of the same model gives
    directly (like with like: no KV cache on either), and refuses what a remote cannot do (raw
    prompts, logprobs) with a 400 naming the field."""
    from models.registry import Registry

    kw = dict(messages=[{"role": "user", "content": "Name three colours."}], **GREEDY)
    with LiveServer(options(models=[MODEL])) as fresh:
        direct = OpenAI(base_url=fresh.url, api_key="unused", max_retries=0, timeout=120)
        direct = direct.chat.completions.create(model=MODEL, **kw).choices[0].message.content
    with LiveServer(options(models=[MODEL])) as origin:
        Registry().add_remote("far", origin.url, MODEL, n_ctx=1024)
        with LiveServer(options(models=[])) as relay:
            front = OpenAI(base_url=relay.url, api_key="unused", max_retries=0, timeout=120)
            listed = {m.id: m.model_extra["crofter"].get("source") for m in front.models.list().data}
            assert listed.get("far") == "remote" and MODEL in listed
            assert front.chat.completions.create(model="far", **kw).choices[0].message.content == direct
            r = httpx.post(relay.url + "/completions", json={"model": "far", "prompt": "hi"}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model"
            r = httpx.post(relay.url + "/chat/completions", json={"model": "far", "logprobs": True, **kw}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_every_answer_carries_the_engines_timings(client):
    r = chat(client)
    t = r.model_extra["crofter"]["timings"]
    assert 0 < t["ttft_ms"] <= t["total_ms"] and 0 < t["prompt_tokens_evaluated"] <= r.usage.prompt_tokens
    stream = list(chat(client, stream=True, stream_options={"include_usage": True}))
    final = [ch for ch in stream if ch.choices and ch.choices[0].finish_reason][-1]
    assert final.model_extra["crofter"]["timings"]["ttft_ms"] > 0


def test_a_remote_model_neither_counts_nor_evicts_a_local_one():
    import asyncio

    from app.serve.pool import ModelPool
    from models.registry import ModelEntry

    class Fake:
        n_ctx = 8

        def __init__(self, entry):
            self.closed = False

        def close(self):
            self.closed = True

    entries = {"a": ModelEntry("a", "/a.gguf", "gguf"), "b": ModelEntry("b", "/b.gguf", "gguf"),
               "far": ModelEntry("far", "http://x", "remote")}

    async def use(pool, name):
        slot = pool.join(name)
        engine = await pool.engine(slot)
        pool.leave(slot)
        return engine

    async def go():
        pool = ModelPool(entries, Fake, max_models=1)
        a = await use(pool, "a")
        await use(pool, "far")
        assert pool.resident() == ["a", "far"] and not a.closed
        await use(pool, "b")  # a local model still evicts the other local one
        assert pool.resident() == ["far", "b"]

    asyncio.run(go())


# -- what a web page cannot do ----------------------------------------------------------------------
def test_a_body_not_sent_as_json_and_a_foreign_host_are_refused(server):
    body = b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        r = httpx.post(server.url + "/chat/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type", r.text
    r = httpx.post(server.url + "/chat/completions", content=body, timeout=60,
                   headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    r = httpx.get(server.url + "/models", headers={"host": f"rebound.example:{server.port}"})
    assert r.status_code == 421 and "rebound.example" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/models", headers={"host": f"localhost:{server.port}"}).status_code == 200
    assert httpx.get(server.url + "/models", headers={"host": f"[::1]:{server.port}"}).status_code == 200


def test_allowed_host_names_and_a_request_without_host_are_answered():
    """--allow-host adds a name (a proxy passing its own); *.localhost is always loopback; a
    request with no Host at all (HTTP/1.0, never a browser) is answered."""
    import socket

    with LiveServer(options(models=[MODEL], hosts=["localhost", "127.0.0.1", "::1", "Proxy.Example:443"])) as s:
        for host, want in (("proxy.example", 200), ("app.localhost:3000", 200), ("other.example", 421)):
            assert httpx.get(s.url + "/models", headers={"host": host}).status_code == want, host
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as conn:
            conn.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
            assert conn.recv(64).split(b"\r\n")[0].endswith(b"200 OK")


def test_the_command_answers_any_host_only_off_loopback(crofter_home):
    import argparse

    from app.commands import serve

    p = argparse.ArgumentParser()
    serve.add_parser(p.add_subparsers())
    local = serve.options_from_args(p.parse_args(["serve", "--allow-host", "box.lan"]))
    assert set(local.hosts) == {"127.0.0.1", "::1", "localhost", "box.lan"}
    assert serve.options_from_args(p.parse_args(["serve", "--host", "0.0.0.0"])).hosts == []


def test_host_names_are_read_without_their_port():
    from app.serve.app import host_name

    assert host_name("127.0.0.1:8080") == "127.0.0.1" and host_name("[::1]:80") == "::1" and host_name("[::1]") == "::1"
    assert host_name("LocalHost.") == "localhost" and host_name("evil.example:80") == "evil.example"


def test_file_tools_run_on_the_server_only_when_allowed(tmp_path):
    """read_file needs --allow-tool on a server: nobody is there to approve reading the files."""
    from app.config import Settings

    root = tmp_path / "files"
    root.mkdir()
    (root / "notes.txt").write_text("Buy milk.")
    settings = Settings(temperature=0.0, seed=1, max_tokens=32, tool_roots=[str(root)])
    body = {"messages": [{"role": "user", "content": "Read notes.txt."}], "max_tokens": 48, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "read_file"}}, "crofter": {"tools": ["read_file"]}}
    with LiveServer(options(models=[MODEL], settings=settings)) as s:
        first = post(s, body).json()["crofter"]["calls"][0]
    assert first["status"] == "denied" and "milk" not in first["result"]
    with LiveServer(options(models=[MODEL], settings=settings, allow_tools=["read_file"])) as s:
        first = post(s, body).json()["crofter"]["calls"][0]
    assert first == {"name": "read_file", "arguments": {"path": "notes.txt"}, "status": "ok", "result": "Buy milk."}

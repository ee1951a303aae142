"""`crofter serve`'s streaming and its checks before the line: streamed text gathered into chunks
(`--stream-interval`), and a request naming a crofter tool the server lacks refused before it
waits. Real engine, real `openai` client, real uvicorn on loopback."""
from __future__ import annotations

import pytest
from openai import OpenAI

from .serve_server import LiveServer, options
from .test_serve_extras import MODEL, NOTE_TOOL, _settings, chat, post


# -- streamed chunks ---------------------------------------------------------------------------------
def test_streamed_text_is_coalesced_but_the_first_piece_and_every_other_event_go_at_once():
    from app.serve.app import coalesced
    from app.turn import Done, TextDelta, ThinkingDelta, ToolFinished

    clock = iter([0.0, 0.005, 0.010, 0.030, 0.031, 0.040, 0.041, 0.050])  # read once per text piece
    call, done = ToolFinished(None), Done("abcdefg", None, None, "stop")
    events = [ThinkingDelta("t"), TextDelta("a"), TextDelta("b"), TextDelta("c"), call, TextDelta("d"),
              TextDelta("e"), TextDelta("f"), TextDelta("g"), done]
    out = list(coalesced(iter(events), 0.02, clock=lambda: next(clock)))
    assert out == [ThinkingDelta("t"), TextDelta("abc"), call, TextDelta("defg"), done]
    held = list(coalesced(iter([TextDelta("x"), TextDelta("y"), TextDelta("z")]), 10.0, clock=iter([0, 1, 2]).__next__))
    assert held == [TextDelta("x"), TextDelta("yz")]  # nothing is kept past the end

    went = []
    def broken():
        yield TextDelta("p")
        yield TextDelta("q")
        raise RuntimeError("engine gone")
    with pytest.raises(RuntimeError):
        for ev in coalesced(broken(), 10.0, clock=iter([0, 1]).__next__):
            went.append(ev)
    assert went == [TextDelta("p"), TextDelta("q")]  # the held piece went out before the error
    switch = list(coalesced(iter([TextDelta("a"), ThinkingDelta("b"), ThinkingDelta("c"), TextDelta("d")]), 10.0,
                            clock=iter([0, 1, 2, 3]).__next__))
    assert switch == [TextDelta("a"), ThinkingDelta("bc"), TextDelta("d")]


def test_completion_pieces_merge_per_choice_and_interval_zero_sends_every_piece():
    from app.serve.app import coalesced
    from app.serve.completions import ChoiceDone, TextPiece

    ticks = iter(range(100))
    end = ChoiceDone(1, {}, None, 3, "length")
    pieces = [TextPiece(0, "a"), TextPiece(0, "b"), TextPiece(0, "c"), TextPiece(1, "x"), TextPiece(1, "y"), end,
              TextPiece(0, "d")]
    out = list(coalesced(iter(pieces), 10.0, clock=lambda: next(ticks)))
    assert out == [TextPiece(0, "a"), TextPiece(0, "bc"), TextPiece(1, "xy"), end, TextPiece(0, "d")]
    every = [TextPiece(0, "a"), TextPiece(0, "b")]
    assert list(coalesced(iter(every), 0.0, clock=lambda: 5.0)) == every  # no time passes, still no merging


@pytest.mark.parametrize("interval, most", [(10.0, 2), (0.0, None)])
def test_the_stream_interval_sets_how_many_chunks_a_reply_takes(interval, most):
    """10 s: the first piece at once, the rest with the end (one more per 10 s a slow machine
    takes); 0: a chunk per token."""
    import time

    with LiveServer(options(models=[MODEL], stream_interval=interval)) as s:
        c = OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=120)
        t0 = time.monotonic()
        stream = list(chat(c, stream=True, stream_options={"include_usage": True}))
        elapsed = time.monotonic() - t0
    texts = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    tokens = stream[-1].usage.completion_tokens
    assert tokens >= 4 and texts
    if most is not None:
        assert len(texts) <= most + int(elapsed // interval)
    else:
        assert len(texts) >= tokens - 2  # a token that ends inside a UTF-8 character or a held stop may merge


def test_serve_refuses_a_bad_stream_interval_in_one_line(capsys):
    from app.cli import main

    assert main(["serve", "--stream-interval", "-5", "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert "--stream-interval -5: must be 0..10000 ms" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="stream_interval"):
        options(stream_interval=-1)


# -- crofter tools, checked before the line ------------------------------------------------------------
def test_an_unknown_crofter_tool_is_refused_without_waiting_in_line(crofter_home):
    """The line is busy with a long stream; a request naming a tool the server lacks gets its
    400 while that stream is still going. A tool file added later is seen by the next request."""
    import threading

    with LiveServer(options(models=[MODEL], settings=_settings(max_tokens=400))) as s:
        c = OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=120)
        first, done = threading.Event(), threading.Event()

        def long_stream():  # a grammar makes the reply long whatever this machine's model would say
            for ch in chat(c, "Write a long story about the sea.", stream=True, max_tokens=400,
                           extra_body={"grammar": 'root ::= "ab "{150}'}):
                first.set()
            done.set()

        t = threading.Thread(target=long_stream, daemon=True)
        t.start()
        assert first.wait(60)
        r = post(s, {"messages": [{"role": "user", "content": "Note this."}], "crofter": {"tools": ["write_note"]}})
        busy = not done.is_set()
        assert r.status_code == 400 and "no tool named 'write_note'" in r.json()["error"]["message"], r.text
        assert "calculator" in r.json()["error"]["message"]
        t.join(120)
        assert busy, "the 400 came only after the stream in line had finished"
        tools = crofter_home / "tools"
        tools.mkdir(parents=True, exist_ok=True)
        (tools / "note.py").write_text(NOTE_TOOL)
        r = post(s, {"messages": [{"role": "user", "content": "Note this."}], "max_tokens": 48,
                     "tool_choice": {"type": "function", "function": {"name": "write_note"}},
                     "crofter": {"tools": ["write_note"]}})
        assert r.status_code == 200 and r.json()["crofter"]["calls"][0]["status"] == "denied", r.text


def test_tool_names_are_discovered_again_only_when_a_tool_file_changes(crofter_home, monkeypatch):
    from app.config import Settings
    from app.serve.client_tools import ToolNames
    from app.tools import registry

    calls = []
    real = registry.ToolRegistry.for_settings.__func__
    monkeypatch.setattr(registry.ToolRegistry, "for_settings",
                        classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    names = ToolNames(Settings())
    assert "calculator" in names.names() and "write_note" not in names.names() and len(calls) == 1
    tools = crofter_home / "tools"
    tools.mkdir(parents=True, exist_ok=True)
    (tools / "note.py").write_text(NOTE_TOOL)
    assert "write_note" in names.names() and len(calls) == 2
    names.check(["write_note", "calculator", "search_documents"])
    assert len(calls) == 2
    with pytest.raises(Exception, match="no tool named 'nope'"):
        names.check(["nope"])

"""`crofter` as a user runs it: real processes, real model, exit codes and JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.anchors import raw_greedy


def crofter(*args, input=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True, text=True, input=input, timeout=300, env={**os.environ, **(env or {})},
    )


def test_ask_json_schema_and_the_reply_of_plain_llama_cpp(engine, raw_llm):
    question = "What is the capital of France?"
    r = crofter("ask", question, "-t", "0", "-n", "32", "--n-ctx", "2048", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"model", "text", "finish_reason", "usage", "timings"}
    assert out["model"] == "smollm2-135m"
    # The same greedy reply as llama-cpp-python on its own gives on this machine.
    tokens = engine.tokenize_chat([{"role": "user", "content": question}])
    assert out["text"] and out["text"] == raw_greedy(raw_llm, tokens, 32)
    assert out["usage"]["prompt_tokens"] == len(tokens)
    assert set(out["usage"]) == {"prompt_tokens", "completion_tokens"}
    assert set(out["timings"]) == {"prompt_tokens_evaluated", "ttft_s", "decode_tokens_per_s"}
    assert out["timings"]["prompt_tokens_evaluated"] == out["usage"]["prompt_tokens"]


def test_streamed_stdout_equals_json_text():
    args = ("ask", "-", "-t", "0", "-n", "40")
    streamed = crofter(*args, input="Name a large animal.")
    as_json = crofter(*args, "--json", input="Name a large animal.")
    assert streamed.returncode == 0 and as_json.returncode == 0
    assert streamed.stdout.rstrip("\n") == json.loads(as_json.stdout)["text"].rstrip("\n")


def test_usage_error_exits_2():
    r = crofter("ask")
    assert r.returncode == 2
    assert "required" in r.stderr


def test_runtime_error_is_one_line_exit_1(tmp_path):
    r = crofter("ask", "hi", "--model", "no-such-model")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["crofter: error: no model named 'no-such-model' (see `crofter models list`)"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    r = crofter("ask", "hi", "--model", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(bad) in r.stderr and "version" in r.stderr


def test_debug_shows_traceback():
    r = crofter("--debug", "ask", "hi", "--model", "no-such-model")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_empty_stdin_prompt_is_refused():
    r = crofter("ask", "-", input="   \n")
    assert r.returncode == 1 and "prompt is empty" in r.stderr


def test_help_imports_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['ask', '--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('llama_cpp', 'torch', 'transformers', 'chromadb', 'sentence_transformers', 'numpy', 'gguf') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_version():
    r = crofter("--version")
    assert r.returncode == 0 and r.stdout.startswith("crofter ")


def test_config_set_show_and_refusal():
    assert crofter("config", "set", "temperature", "0.25").returncode == 0
    shown = json.loads(crofter("config", "show", "--json").stdout)
    assert shown["temperature"] == 0.25
    bad = crofter("config", "set", "temperature", "warm")
    assert bad.returncode == 1 and "temperature" in bad.stderr
    unknown = crofter("config", "set", "temprature", "1")
    assert unknown.returncode == 1 and "unknown key 'temprature'" in unknown.stderr
    out_of_range = crofter("config", "set", "top_p", "2")
    assert out_of_range.returncode == 1 and "top_p" in out_of_range.stderr


def test_flags_override_config():
    crofter("config", "set", "max_tokens", "200")
    r = crofter("ask", "Write a long story about a dragon.", "-t", "0", "-n", "3", "--json")
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 3


def test_models_list_and_info_json(bundled_path):
    rows = json.loads(crofter("models", "list", "--json").stdout)
    assert rows[0]["name"] == "smollm2-135m" and rows[0]["default"] is True
    info = json.loads(crofter("models", "info", "smollm2-135m", "--json").stdout)
    assert info["architecture"] == "llama"
    assert info["quantization"] == "Q4_1"
    assert info["context_length"] == 8192
    assert info["chat_template"] is True
    assert info["size_bytes"] == bundled_path.stat().st_size


@pytest.mark.parametrize("settings", [{"n_ctx": "abc"}, {"seed": "-5"}, {"gpu_layers": "-2"}])
def test_invalid_config_values_name_the_key(settings):
    (key, value), = settings.items()
    r = crofter("config", "set", key, value)
    assert r.returncode == 1 and key in r.stderr


def test_ask_with_tools_json_lists_calls():
    r = crofter("ask", "What is 12 * 7? Use the calculator.", "--tools", "-t", "0", "-n", "48", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["tool_calls"], list)
    for call in out["tool_calls"]:
        assert set(call) == {"name", "arguments", "status", "result"}
        assert call["name"] in ("calculator", "current_time")  # no roots: no file tools offered


def test_allow_tool_must_name_a_tool():
    r = crofter("ask", "hi", "--tools", "--allow-tool", "rm_rf")
    assert r.returncode == 1 and "--allow-tool rm_rf: no such tool" in r.stderr


def test_ask_shows_control_characters_of_tool_results_and_on_a_terminal(capsys, monkeypatch):
    """A file with an escape sequence, read by a tool and quoted by the answer, cannot drive the
    terminal: stderr's tool line always shows it, stdout on a terminal too; a pipe gets it as is."""
    import argparse
    import io

    from app.commands.ask import _print_turn
    from app.tools.calling import ToolCall
    from app.turn import Done, TextDelta, ToolFinished

    evil = "\x1b[2Jgone"
    events = [ToolFinished(ToolCall("read_file", {"path": "x.txt"}, "ok", evil)), TextDelta(evil),
              Done(evil, None, None, "stop")]
    args = argparse.Namespace(json=False, show_thinking=False)
    _print_turn(args, iter(events))
    out, err = capsys.readouterr()
    assert out == evil and "\x1b" not in err and "gone" in err  # a pipe: the text as it is

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    _print_turn(args, iter(events))
    assert "\x1b" not in tty.getvalue() and tty.getvalue().endswith("gone")

"""BI3: a GGUF that passes validation but kills llama.cpp is quarantined by a test load
in a child process; this process survives, and a good model is probed once only."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app import probe
from app.engine import Engine, EngineError, LoadOptions
from models.gguf_check import check_gguf
from models.info import describe
from models.registry import Registry, fingerprint
from tests import gguf_build as gb
from tests.models import gguf_edit as ge

# Two real ways a well-formed GGUF kills the process (found by trying, llama-cpp-python 0.3.36):
CRASHES = {
    # vocabulary attack: the GPT-2 BPE vocabulary relabelled SentencePiece. It loads; the
    # first "\n" tokenized falls back to the missing byte token <0x0A> -> std::out_of_range
    # thrown through llama_tokenize -> std::terminate -> SIGABRT.
    "vocab-spm-relabel": {"tokenizer.ggml.model": gb.kv_str("tokenizer.ggml.model", "llama")},
    # hparams attack: experts used but none declared -> GGML_ASSERT(n_expert_used_max <=
    # hparams.n_expert) in llama-model.cpp -> abort() during the load.
    "hparams-expert-used": {"llama.expert_used_count": gb.kv_u32("llama.expert_used_count", 1)},
}
SIGNATURES = {"vocab-spm-relabel": "std::out_of_range", "hparams-expert-used": "GGML_ASSERT"}


@pytest.fixture(scope="module")
def crash_files(tmp_path_factory, bundled_path):
    """The bundled model with one defect planted in its header; the tensor data is a
    sparse hole (llama.cpp dies before it reads a weight)."""
    folder = tmp_path_factory.mktemp("crash-ggufs")
    return {name: ge.rewrite(bundled_path, folder / f"{name}.gguf", rep, sparse=True) for name, rep in CRASHES.items()}


@pytest.mark.parametrize("name", list(CRASHES))
def test_crash_files_pass_validation_and_really_kill_llama_cpp(crash_files, name):
    """The premise: check_gguf accepts the file, and loading it in-process is fatal."""
    path = crash_files[name]
    check_gguf(path)
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from llama_cpp import Llama; "
         "Llama(sys.argv[1], n_ctx=64, verbose=True).tokenize(b'a\\nb')", str(path)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "GGML_NO_BACKTRACE": "1"},
    )
    assert child.returncode == -6, (child.returncode, child.stderr[-500:])  # SIGABRT
    assert SIGNATURES[name] in child.stderr


@pytest.mark.parametrize("name", list(CRASHES))
def test_crash_gguf_is_quarantined_and_this_process_survives(crash_files, name, monkeypatch):
    reg = Registry()
    entry = reg.add(crash_files[name], name="evil")
    with pytest.raises(EngineError) as info:
        Engine.load(entry, LoadOptions(n_ctx=128))
    msg = str(info.value)
    assert msg.startswith("model failed to load in a test process: killed by SIGABRT")
    assert SIGNATURES[name] in msg
    assert msg.endswith("quarantined — `crofter models rm evil` or re-add it")
    assert "\n" not in msg

    # We are still here; the registry remembers, and `models list` shows why.
    stored = reg.get("evil")
    assert "SIGABRT" in stored.quarantine and stored.probed == ""
    assert json.loads(reg.file.read_text())["models"]["evil"]["quarantine"] == stored.quarantine
    row = describe(stored)
    assert row["quarantined"] == stored.quarantine and row["error"].startswith("quarantined: model failed")

    # The next load is refused from the record, without another child process.
    def no_second_probe(*a, **k):
        raise AssertionError("a quarantined model was probed again")

    monkeypatch.setattr(probe, "run_probe", no_second_probe)
    with pytest.raises(EngineError, match="quarantined — `crofter models rm evil`"):
        Engine.load(stored, LoadOptions(n_ctx=128))

    # Re-adding the file clears the record (the user's explicit retry).
    assert reg.add(crash_files[name], name="evil").quarantine == ""
    assert reg.get("evil").quarantine == ""


def test_good_model_is_probed_once_then_loads_directly(tmp_path, bundled_path, monkeypatch):
    link = tmp_path / "my-smol.gguf"
    link.symlink_to(bundled_path)  # registered by its resolved path, like any local file
    reg = Registry()
    entry = reg.add(link, name="my-smol")
    assert entry.probed == "" and entry.source == "local"
    calls = []
    real_run = probe.run_probe

    def counted(path, *a, **k):
        calls.append(path)
        return real_run(path, *a, **k)

    # The bundled-file shortcut is for the bundled entry; force this one through the child.
    monkeypatch.setattr(probe, "bundled_gguf", lambda: None)
    monkeypatch.setattr(probe, "run_probe", counted)
    eng = Engine.load(entry, LoadOptions(n_ctx=128))
    eng.close()
    assert calls == [entry.file]
    stored = reg.get("my-smol")
    assert stored.probed == fingerprint(entry.file) and stored.quarantine == ""

    eng = Engine.load(stored, LoadOptions(n_ctx=128))
    eng.close()
    assert calls == [entry.file]  # the marked model went straight to llama.cpp


def test_bundled_model_is_never_probed(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the bundled model was probed")

    monkeypatch.setattr(probe, "run_probe", boom)
    bundled = Registry().get("smollm2-135m")
    assert bundled.probed == fingerprint(bundled.file)
    probe.ensure_probed(bundled)  # returns without a child process


def test_reason_is_one_line_naming_the_signal():
    stderr = "llama_model_load: foo\n/x/llama-model.cpp:1362: GGML_ASSERT(a <= b) failed\nmore\n"
    assert probe._reason(-6, stderr) == "killed by SIGABRT (/x/llama-model.cpp:1362: GGML_ASSERT(a <= b) failed)"
    assert probe._reason(1, "Traceback\nValueError: Failed to load model from file: m.gguf\n") == (
        "exit status 1 (ValueError: Failed to load model from file: m.gguf)")
    assert probe._reason(-9, "") == "killed by SIGKILL"


def test_unregistered_crash_file_is_refused_and_nothing_is_recorded(crash_files):
    """A model used by path (not in the registry) is probed on each load; no record is written."""
    from models.registry import ModelEntry

    entry = ModelEntry("loose", str(crash_files["hparams-expert-used"]), "gguf", "path")
    with pytest.raises(probe.ProbeError, match="killed by SIGABRT .*GGML_ASSERT"):
        probe.ensure_probed(entry)
    assert not Registry().file.exists()

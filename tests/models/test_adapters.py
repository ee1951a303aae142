"""The adapter resolver on hand-made folders: adapter folders, run folders, killed runs, cut files."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from models.adapters import AdapterError, checkpoint_complete, last_complete_checkpoint, resolve_adapter
from models.registry import ModelError


def make_adapter(folder):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"a.lora_A.weight": np.zeros((2, 4), np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


def make_checkpoint(checkpoints, step, complete=True):
    d = make_adapter(checkpoints / f"checkpoint-{step}")
    if complete:
        (d / "optimizer.pt").write_bytes(b"x" * 16)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def make_run(tmp_path, adapter=True, steps=(), incomplete=()):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "sft", "base": "b"}))
    for s in steps:
        make_checkpoint(run / "checkpoints", s)
    for s in incomplete:
        make_checkpoint(run / "checkpoints", s, complete=False)
    if adapter:
        make_adapter(run / "adapter")
    return run


def test_a_plain_adapter_folder_is_taken_as_is_without_a_note(tmp_path):
    notes = []
    a = make_adapter(tmp_path / "my-adapter")
    assert resolve_adapter(a, note=notes.append) == a
    assert notes == []


def test_a_run_folder_gives_its_adapter_and_says_so(tmp_path):
    notes = []
    run = make_run(tmp_path, steps=(2, 4))
    assert resolve_adapter(run, note=notes.append) == run / "adapter"
    assert notes == [f"crofter: using the adapter in {run / 'adapter'}"]


def test_the_note_goes_to_stderr_by_default(tmp_path, capsys):
    run = make_run(tmp_path)
    resolve_adapter(str(run))
    out, err = capsys.readouterr()
    assert out == "" and err == f"crofter: using the adapter in {run / 'adapter'}\n"


def test_a_killed_run_is_refused_naming_its_last_complete_checkpoint(tmp_path):
    run = make_run(tmp_path, adapter=False, steps=(2, 4), incomplete=(6,))
    with pytest.raises(AdapterError) as e:
        resolve_adapter(run)
    msg = str(e.value)
    assert "no adapter/" in msg and "stopped before it finished" in msg
    assert str(run / "checkpoints" / "checkpoint-4") in msg and "checkpoint-6" not in msg
    assert "\n" not in msg


def test_a_run_killed_before_its_first_save_is_refused(tmp_path):
    run = make_run(tmp_path, adapter=False, incomplete=(2,))
    with pytest.raises(AdapterError, match="no adapter/ and no complete checkpoint"):
        resolve_adapter(run)


def test_a_run_folder_with_only_its_config_is_recognised(tmp_path):
    run = make_run(tmp_path, adapter=False)
    with pytest.raises(AdapterError, match="this run folder has no adapter/"):
        resolve_adapter(run)


def test_a_complete_checkpoint_is_an_adapter_and_a_cut_one_is_refused(tmp_path):
    run = make_run(tmp_path, adapter=False, steps=(2,), incomplete=(4,))
    good = run / "checkpoints" / "checkpoint-2"
    assert resolve_adapter(good, note=None) == good
    with pytest.raises(AdapterError, match=r"checkpoint-4: this checkpoint was not saved to the end.*checkpoint-2"):
        resolve_adapter(run / "checkpoints" / "checkpoint-4")


def test_a_cut_weights_file_is_refused_naming_it(tmp_path):
    a = make_adapter(tmp_path / "a")
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-5])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: .*cut short"):
        resolve_adapter(a)
    w.write_bytes(b"\xff" * 12)  # header length far past the end of the file
    with pytest.raises(AdapterError, match="runs past the end"):
        resolve_adapter(a)


def test_a_run_adapter_with_cut_weights_is_refused(tmp_path):
    run = make_run(tmp_path)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="shorter than its header"):
        resolve_adapter(run)


def test_bad_config_json_names_the_file(tmp_path):
    a = make_adapter(tmp_path / "a")
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"a/adapter_config\.json: not valid JSON"):
        resolve_adapter(a)
    (a / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="expected a JSON object"):
        resolve_adapter(a)


def test_pickled_weights_are_refused(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "adapter_config.json").write_text("{}")
    (a / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="only pickled adapter_model.bin"):
        resolve_adapter(a)


def test_other_paths_are_refused_with_what_was_expected(tmp_path):
    with pytest.raises(AdapterError, match="no such folder"):
        resolve_adapter(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(AdapterError, match="not a folder"):
        resolve_adapter(tmp_path / "f")
    model = tmp_path / "hf-model"  # an HF checkpoint folder: config.json, but no run kind
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AdapterError, match="not a peft adapter folder .* nor a `crofter tune` run folder"):
        resolve_adapter(model)


def test_adapter_errors_are_model_errors_the_cli_prints_in_one_line():
    assert issubclass(AdapterError, ModelError)


def test_last_complete_checkpoint_takes_the_highest_complete_step(tmp_path):
    ck = tmp_path / "checkpoints"
    assert last_complete_checkpoint(ck) is None
    make_checkpoint(ck, 9)
    make_checkpoint(ck, 10)  # numeric, not lexical, order: 10 > 9
    make_checkpoint(ck, 12, complete=False)
    d = make_checkpoint(ck, 11)
    (d / "trainer_state.json").write_text('{"global_st')  # the state file a kill cut
    (ck / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(ck) == ck / "checkpoint-10"
    assert not checkpoint_complete(d)
    (ck / "checkpoint-10" / "optimizer.pt").unlink()
    assert last_complete_checkpoint(ck) == ck / "checkpoint-9"


def test_the_resolver_imports_no_torch():
    code = "import sys, models.adapters; print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr

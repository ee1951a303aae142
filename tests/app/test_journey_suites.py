"""A journey's prompt suite after every stage, adapter stages included (the adapter converted for
llama.cpp and applied to the base's GGUF, not merged); `journey diff` by stage names; a warning when
the calibration text is the eval text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.journey.plan import load_journey
from app.journey.runner import plan
from tests.converter.conftest import crofter, tiny_llama

from .test_journey import PERSONA, _journey

# One check every reply passes, one no reply can pass: the pass rate is 0.5 whatever the words.
SUITE = "name: tiny\nprompts:\n  - prompt: Say hello.\n    checks: [{regex: '(?s).*'}]\n  - prompt: Name a colour.\n    checks: [{regex: '(?!)'}]\n"


def test_adapter_stages_run_the_suite_on_the_base_gguf_with_their_adapter(hf_model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Domain text.")
    (tmp_path / "suite.yaml").write_text(SUITE)
    path = _journey(tmp_path, f"""base: {hf_model}
eval: {{text: {notes}, prompts: {tmp_path / 'suite.yaml'}}}
stages:
  pretrain: {{text: {notes}, max_steps: 2}}
  sft: {{data: {PERSONA / 'persona.jsonl'}}}
  dpo: {{data: {PERSONA / 'prefs.jsonl'}}}
""")
    run = tmp_path / "run"
    steps, _ = plan(load_journey(path), run, {}, write=False)
    by = {p.name: p for p in steps}
    assert by["00-base"].step.argv[:2] == ["convert", str(hf_model)]       # the first base's GGUF, a step of its own
    pre = by["01-pretrain"].eval_cmds
    new_gguf = str(run / "01-pretrain" / "base-F16.gguf")
    assert ["convert", str(run / "01-pretrain" / "model"), "--out", new_gguf] == pre[1][:4]  # the new base, converted
    assert pre[2][:2] == ["eval", new_gguf] and "--prompts" in pre[2]
    for name in ("02-sft", "03-dpo"):
        cmds = by[name].eval_cmds
        lora = str(run / name / "adapter-F32.gguf")
        assert cmds[1][:5] == ["convert-lora", str(run / name / "adapter"), "--base", str(run / "01-pretrain" / "model"), "--out"]
        assert cmds[1][5] == lora
        assert cmds[2][:4] == ["eval", new_gguf, "--adapter", lora] and "--prompts" in cmds[2]  # on the pretrained base


def test_a_journey_without_a_suite_converts_nothing_for_one(hf_model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Domain text.")
    path = _journey(tmp_path, f"base: {hf_model}\neval: {{text: {notes}}}\nstages:\n  sft: {{data: {PERSONA / 'persona.jsonl'}}}\n")
    steps, _ = plan(load_journey(path), tmp_path / "run", {}, write=False)
    assert [p.step for p in steps if p.name == "00-base"] == [None]
    assert all(c[0] == "eval" and "--prompts" not in c for p in steps for c in p.eval_cmds)


def _run_with_suite(d: Path, top: str, first: str = "") -> tuple[Path, Path, Path]:
    """Write and run a journey in `d`: `top` (base or name), held-out text and SUITE after every
    stage, the stage lines `first`, then a 2-step SFT; returns (journey file, run folder, home)."""
    (d / "fast.yaml").write_text("save_steps: 2\nbatch_size: 2\nmax_length: 64\ngradient_checkpointing: false\n"
                                 "warmup_ratio: 0.0\neval_split: 0.0\nlearning_rate: 0.01\n")
    (d / "suite.yaml").write_text(SUITE)
    path = _journey(d, f"""{top}
eval: {{text: {PERSONA / 'held_out.txt'}, ctx: 32, max_windows: 2, prompts: {d / 'suite.yaml'}}}
stages:
{first}  sft: {{data: {PERSONA / 'persona.jsonl'}, recipe: fast.yaml, max_steps: 2}}
""")
    home = d / "home"
    home.mkdir()
    assert crofter("config", "set", "max_tokens", "8", home=home).returncode == 0
    r = crofter("journey", "run", str(path), "--out", str(d / "run"), home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    return path, d / "run", home


@pytest.fixture(scope="module")
def tiny_run(hf_model, tmp_path_factory):
    """A real journey on a tiny Llama: the base and an SFT stage, each with held-out text and a suite."""
    d = tmp_path_factory.mktemp("suites")
    return _run_with_suite(d, f"base: {tiny_llama(hf_model, d / 'tiny')}\nname: tiny-suites")


def test_the_suite_runs_on_the_sft_stage_through_its_adapter(tiny_run):
    _path, run, _home = tiny_run
    state = json.loads((run / "journey.json").read_text())
    for name, model in (("00-base", "base-F16.gguf"), ("01-sft", "base-F16.gguf+adapter-F32.gguf")):
        rows = [r for r in state["stages"][name]["eval"] if r["suite"] == "prompts" and r["metric"] == "pass_rate"]
        assert len(rows) == 1 and rows[0]["model"] == model and rows[0]["n"] == 2, (name, rows)
        assert rows[0]["value"] == 0.5
    assert (run / "01-sft" / "adapter-F32.gguf").is_file()
    report = (run / "report.md").read_text()
    assert "prompt suite" in report and "| 01-sft |" in report


def test_the_run_folder_spelt_another_way_is_still_up_to_date(tiny_run, tmp_path):
    path, run, home = tiny_run
    link = tmp_path / "same-run"
    link.symlink_to(run)
    r = crofter("journey", "run", str(path), "--out", str(link), home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("up to date, skipped") == 2 and "evaluating" not in r.stderr, r.stderr[-3000:]


def test_journey_diff_takes_stage_names_and_writes_into_the_run(tiny_run, tmp_path):
    path, run, home = tiny_run
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me about the sea.\nWhat is bread?\n")
    r = crofter("journey", "diff", "base", "sft", "--run", str(run), "--prompts", str(prompts), "--max-tokens", "16",
                "--json", home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["json"] == str(run / "diffs" / "base-vs-sft" / "diff.json") and Path(out["png"]).is_file()
    assert out["b"]["adapter"] == str(run / "01-sft" / "adapter")
    for a, b, message in (("base", "nope", "no stage 'nope' (stages: base, sft)"),
                          ("base", "01-sft", None)):
        got = crofter("journey", "diff", a, b, "--run", str(run), "--prompts", str(prompts), "--max-tokens", "4",
                      "--out", str(tmp_path / "d"), home=home)
        if message:
            assert got.returncode != 0 and message in got.stderr, got.stderr[-2000:]
        else:
            assert got.returncode == 0 and (tmp_path / "d" / "diff.json").is_file(), got.stderr[-2000:]


def test_journey_diff_by_name_refuses_gguf_stages_and_stages_not_run(hf_model, tmp_path):
    from app.commands.journey_diff import stage_spec
    from finetune.diff_inputs import DiffError

    notes = tmp_path / "notes.txt"
    notes.write_text("text")
    path = _journey(tmp_path, f"base: {hf_model}\nstages:\n  sft: {{data: {PERSONA / 'persona.jsonl'}}}\n"
                              "  merge: {}\n  convert: {}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "journey.json").write_text(json.dumps({"journey": str(path), "stages": {"01-sft": {"status": "done"}}}))
    assert stage_spec("base", str(run)) == (str(hf_model), run)
    assert stage_spec("sft", str(run)) == (str(run / "01-sft"), run)
    with pytest.raises(DiffError, match="stage 03-convert: a GGUF"):
        stage_spec("convert", str(run))
    with pytest.raises(DiffError, match="stage 02-merge: has not finished"):
        stage_spec("merge", str(run))
    with pytest.raises(DiffError, match="not a journey run folder"):
        stage_spec("sft", str(tmp_path))


def test_journey_diff_by_a_journey_file_reads_its_default_run_with_its_sets(hf_model, tmp_path, monkeypatch):
    from app.commands.journey_diff import stage_spec
    from app.journey.runner import run_dir_for
    from finetune.diff_inputs import DiffError

    monkeypatch.setenv("CROFTER_HOME", str(tmp_path / "home"))
    path = _journey(tmp_path, f"stages:\n  sft: {{data: {PERSONA / 'persona.jsonl'}}}\n")  # its base came from --set
    with pytest.raises(DiffError, match=r"has not run in its default folder .* give --run DIR"):
        stage_spec("sft", str(path))
    with pytest.raises(DiffError, match="no such journey file or run folder"):
        stage_spec("sft", str(tmp_path / "nope.yaml"))
    run = run_dir_for(path)
    run.mkdir(parents=True)
    (run / "journey.json").write_text(json.dumps({"journey": str(path), "sets": [f"base={hf_model}"],
                                                  "stages": {"01-sft": {"status": "done"}}}))
    assert stage_spec("base", str(path)) == (str(hf_model), run)
    assert stage_spec("01-sft", str(path)) == (str(run / "01-sft"), run)


def test_calibrating_on_the_eval_text_is_warned_of(hf_model, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("Held-out words.")
    copy = tmp_path / "copy.txt"
    copy.write_text("Held-out words.")
    body = f"base: {hf_model}\neval: {{text: {text}}}\nstages:\n  convert: {{}}\n  quantize: {{calibration: CAL}}\n"
    warned = load_journey(_journey(tmp_path, body.replace("CAL", str(copy))))
    assert len(warned.warnings) == 1 and "stage quantize: calibration" in warned.warnings[0]
    assert "flatter the quant" in warned.warnings[0]
    other = tmp_path / "train.txt"
    other.write_text("Other words entirely.")
    assert load_journey(_journey(tmp_path, body.replace("CAL", str(other)))).warnings == []
    pre = f"base: {hf_model}\neval: {{text: {text}}}\nstages:\n  pretrain: {{text: {tmp_path}}}\n"  # a folder holding it
    (warning,) = load_journey(_journey(tmp_path, pre)).warnings
    assert "stage pretrain: text" in warning and "not held out" in warning
    home = tmp_path / "home"
    home.mkdir()
    r = crofter("journey", "run", str(_journey(tmp_path, body.replace("CAL", str(text)))), "--dry-run",
                "--out", str(tmp_path / "run"), home=home)
    assert r.returncode == 0 and "crofter: warning: " in r.stderr and "is the eval text" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    from tests.converter.nanogpt_build import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


def test_your_own_nanogpt_through_a_journey_with_a_suite_after_each_stage(gpt2_tokenizer, tmp_path):
    """import (a nanoGPT ckpt.pt) -> sft: the imported base gets its GPT-2 GGUF, and the SFT stage's
    Conv1D adapter runs the suite on it through llama.cpp."""
    from tests.converter.nanogpt_build import write_nanogpt

    ckpt, _sd, _args = write_nanogpt(tmp_path / "ckpt.pt", 1000, block_size=128)
    path, run, home = _run_with_suite(tmp_path, "name: tiny-gpt2",
                                      f"  import: {{checkpoint: {ckpt}, tokenizer: {gpt2_tokenizer}}}\n")
    state = json.loads((run / "journey.json").read_text())
    assert state["order"] == ["01-import", "02-sft"]
    for name, model in (("01-import", "base-F16.gguf"), ("02-sft", "base-F16.gguf+adapter-F32.gguf")):
        rows = {(x["suite"], x["metric"]): x for x in state["stages"][name]["eval"]}
        assert rows[("prompts", "pass_rate")]["model"] == model and rows[("prompts", "pass_rate")]["value"] == 0.5
        assert rows[("perplexity", "ppl")]["value"] > 1
    assert (run / "01-import" / "base-F16.gguf").is_file() and (run / "02-sft" / "adapter-F32.gguf").is_file()
    # The imported base's GGUF is made by its evaluation, for the later suites: deleted, it is made again.
    (run / "01-import" / "base-F16.gguf").unlink()
    status = json.loads(crofter("journey", "status", str(path), "--out", str(run), "--json", home=home).stdout)
    assert [(s["status"], s["eval"]) for s in status["stages"]] == [("done", "to evaluate"), ("done", "evaluated")]
    again = crofter("journey", "run", str(path), "--out", str(run), home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/2] 01-import: evaluating" in again.stderr and "02-sft: evaluating" not in again.stderr
    assert (run / "01-import" / "base-F16.gguf").is_file()

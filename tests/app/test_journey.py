"""`crofter journey`: the journey file checked whole before anything runs, and a real journey on a
tiny real Llama (SmolLM2's tokenizer, 2 layers): every stage runs, is evaluated and reported; a
re-run skips everything; a changed stage re-runs with what follows and nothing before it; a kill -9
mid-SFT resumes from the last complete checkpoint; `data: chats` trains on the chat's pairs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.journey.plan import JourneyError, load_journey
from tests.converter.conftest import ROOT, crofter, tiny_llama

EXAMPLES = ROOT / "finetune" / "configs" / "journeys"
PERSONA = EXAMPLES / "persona"


def test_every_example_journey_parses(hf_model, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"stands in for a nanoGPT checkpoint: parsing only checks it exists")
    found = sorted(EXAMPLES.glob("*.yaml"))
    assert {p.stem for p in found} >= {"persona", "nanogpt"}
    for path in found:
        sets = [f"base={hf_model}"] if path.stem != "nanogpt" else [f"import.checkpoint={ckpt}", f"import.tokenizer={hf_model}"]
        j = load_journey(path, sets)
        assert j.stages and j.name and all(s.index == i for i, s in enumerate(j.stages, 1))
        assert [s.kind for s in j.stages][-1] == "quantize"


def _journey(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "j.yaml"
    p.write_text(text)
    return p


BAD = [
    ("colour: red\nbase: B\nstages: {merge: {}}", "unknown key 'colour'"),
    ("base: B\nstages: {sfft: {}}", "stages: unknown stage 'sfft'"),
    ("base: B\nstages: {sft: {data: D, lr: 0.1, steps: 3}}", "stage sft: unknown key 'steps'"),
    ("base: B\nstages: {sft: {lr: 0.1}}", "stage sft: missing key 'data'"),
    ("base: B\nstages: {sft: {data: nowhere.jsonl}}", "stage sft: data:"),
    ("base: B\nstages: {sft: {data: D, max_steps: many}}", "stage sft: max_steps: expected int"),
    ("base: B\nstages: {sft: {data: D}, convert: {}}", "the sft adapter must be merged first"),
    ("base: B\nstages: {quantize: {}}", "quantizing needs a convert stage"),
    ("base: B\nstages: {convert: {outtype: q2}}", "stage convert: outtype"),
    ("base: B\nstages: {sft: {data: D}, dpo: {data: D}, reward: {data: D}, grpo: {prompts: D}, merge: {}}",
     "choose one way to align"),
    ("base: B\nstages: {grpo: {prompts: D, reward: reward}}", "there is none"),
    ("base: B\nstages: {grpo: {prompts: D, reward: 'python:m:f', eval_split: 0.1}}", "stage grpo: unknown key 'eval_split'"),
    ("base: B\neval: {text: D, ctx: 4}\nstages: {convert: {}}", "eval: ctx: at least 32"),
    ("base: no-such-model\nstages: {convert: {}}", "base: no model named 'no-such-model'"),
    ("base: B\neval: {retrieval: D}\nstages: {convert: {}}", "eval: retrieval: name the collection"),
    ("stages: {convert: {}}", "missing key 'base'"),
    ("base: B\nstages: [sft, merge]", "`stages` must map stage names"),
    ("base: B\nstages: {sft: {data: D}\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_journey_is_refused_naming_file_stage_and_key(hf_model, tmp_path, text, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    path = _journey(tmp_path, text.replace("base: B", f"base: {hf_model}").replace(": D", f": {data}"))
    with pytest.raises(JourneyError) as err:
        load_journey(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_set_overrides_keys_with_types_and_reads_its_paths_from_the_current_folder(hf_model, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "mine.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "here")
    j = load_journey(EXAMPLES / "persona.yaml", [f"base={hf_model}", "sft.max_steps=3", "sft.data=mine.jsonl", "name=pirate"])
    sft = j.stage("sft")
    assert sft.cfg["max_steps"] == 3 and sft.cfg["data"] == tmp_path / "here" / "mine.jsonl" and j.name == "pirate"
    assert j.stage("dpo").cfg["data"] == PERSONA / "prefs.jsonl"  # the file's own paths: from its folder
    with pytest.raises(JourneyError, match="expected KEY=VALUE"):
        load_journey(EXAMPLES / "persona.yaml", ["base"])


# -- running ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(hf_model, tmp_path_factory):
    return tiny_llama(hf_model, tmp_path_factory.mktemp("tiny") / "tiny")


def _tiny_journey(tmp_path: Path, tiny: Path, extra: str = "") -> Path:
    (tmp_path / "fast.yaml").write_text("save_steps: 2\nbatch_size: 2\nmax_length: 64\ngradient_checkpointing: false\n"
                                        "warmup_ratio: 0.0\neval_split: 0.0\n")
    return _journey(tmp_path, f"""base: {tiny}
name: tiny-journey
eval: {{text: {PERSONA / 'held_out.txt'}, ctx: 32, max_windows: 2}}
stages:
  sft: {{data: {PERSONA / 'persona.jsonl'}, recipe: fast.yaml, max_steps: 2}}
  merge: {{}}
  convert: {{}}
{extra}""")


def _state(run: Path) -> dict:
    return json.loads((run / "journey.json").read_text())


def test_a_journey_runs_every_stage_reports_it_and_a_rerun_skips_all(tiny, tmp_path):
    path, run, home = _journey_paths(tmp_path, tiny)
    first = crofter("journey", "run", str(path), "--out", str(run), home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    state = _state(run)
    assert [state["stages"][n]["status"] for n in state["order"]] == ["done"] * 4  # base eval, sft, merge, convert
    for name in ("00-base", "01-sft", "02-merge", "03-convert"):
        rows = state["stages"][name]["eval"]
        assert any(r["suite"] == "perplexity" and r["metric"] == "ppl" and r["value"] > 1 for r in rows), name
    report = (run / "report.md").read_text()
    assert "| 01-sft |" in report and "held-out PPL" in report and (run / "report.png").stat().st_size > 1000
    gguf = run / "03-convert" / "model-F16.gguf"
    listed = json.loads(crofter("models", "list", "--json", home=home).stdout)
    assert any(m["name"] == "tiny-journey" and Path(m["path"]) == gguf for m in listed)

    stamp = gguf.stat().st_mtime_ns
    again = crofter("journey", "run", str(path), "--out", str(run), home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date, skipped") == 4 and "$ crofter" not in again.stderr
    assert gguf.stat().st_mtime_ns == stamp

    changed = crofter("journey", "run", str(path), "--out", str(run), "--set", "convert.outtype=f32", home=home)
    assert changed.returncode == 0, changed.stderr[-3000:]
    ran = [line for line in changed.stderr.splitlines() if "$ crofter" in line]
    assert not any(" tune " in line for line in ran)                      # sft and merge: kept
    assert any(" convert " in line and "--outtype f32" in line for line in ran)
    assert (run / "03-convert" / "model-F32.gguf").is_file()

    status = crofter("journey", "status", str(path), "--out", str(run), "--json", home=home)
    assert [s["status"] for s in json.loads(status.stdout)["stages"]] == ["done", "done", "done", "changed"]


def _journey_paths(tmp_path: Path, tiny: Path, extra: str = ""):
    home = tmp_path / "home"
    home.mkdir()
    return _tiny_journey(tmp_path, tiny, extra), tmp_path / "run", home


def test_a_journey_killed_mid_sft_resumes_from_its_last_checkpoint(tiny, tmp_path):
    path, run, home = _journey_paths(tmp_path, tiny)
    path.write_text(path.read_text().replace("max_steps: 2", "max_steps: 6").replace("  merge: {}\n  convert: {}\n", "")
                    .replace("eval: ", "#eval: "))
    code = "import runpy\nrunpy.run_module('app.cli', run_name='__main__', alter_sys=True)"
    proc = subprocess.Popen([sys.executable, "-c", code, "journey", "run", str(path), "--out", str(run)], cwd=ROOT,
                            env={**os.environ, "CROFTER_HOME": str(home)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from models.adapters import last_complete_checkpoint

    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ck = run / "01-sft" / "checkpoints"
            if ck.is_dir() and last_complete_checkpoint(ck) is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the journey ended before a checkpoint was seen"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _state(run)["stages"]["01-sft"]["status"] == "running"
    status = json.loads(crofter("journey", "status", str(path), "--out", str(run), "--json", home=home).stdout)
    assert status["stages"][0]["status"] == "resume"
    again = crofter("journey", "run", str(path), "--out", str(run), home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = _state(run)["stages"]["01-sft"]
    assert rec["status"] == "done" and rec["resumed_from"].startswith("checkpoint-") and "--resume" in rec["argv"]
    assert rec["summary"]["steps"] == 6 and (run / "01-sft" / "adapter" / "adapter_config.json").is_file()


def test_a_second_run_on_the_same_folder_is_refused(tiny, tmp_path):
    import fcntl

    path, run, home = _journey_paths(tmp_path, tiny)
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = crofter("journey", "run", str(path), "--out", str(run), home=home)
    assert r.returncode == 1 and "another `crofter journey run` is working in this folder" in r.stderr
    assert not (run / "journey.json").exists()


def test_dpo_data_chats_trains_on_the_pairs_marked_in_the_chats(tiny, tmp_path, monkeypatch):
    from app import chat_export
    from app.history import HistoryStore
    from app.journey.runner import plan

    path = _journey(tmp_path, f"base: {tiny}\nstages:\n  dpo: {{data: chats, max_steps: 1}}\n")
    with pytest.raises(JourneyError, match="no preference pairs in any chat"):
        plan(load_journey(path), tmp_path / "run", {})
    store = HistoryStore()
    chat = store.new_chat("pirates")
    user = store.add_message(chat.id, "user", "Name a sea.")
    plain = store.add_message(chat.id, "assistant", "The Baltic.")
    store.set_aside(plain, user.id)
    pirate = store.add_message(chat.id, "assistant", "Arr, the Caribbean!")
    store.mark(pirate.id, 1, preferred=True)
    expected = chat_export.training_pairs(store, None)
    steps, _ = plan(load_journey(path), tmp_path / "dry", {}, write=False)
    assert not (tmp_path / "dry" / "data").exists()                      # a dry run writes nothing
    steps, _ = plan(load_journey(path), tmp_path / "run", {})
    data = Path(steps[0].step.data)
    assert [json.loads(line) for line in data.read_text().splitlines()] == expected
    assert expected[0]["chosen"] == "Arr, the Caribbean!" and expected[0]["rejected"] == "The Baltic."
    assert steps[0].step.argv[steps[0].step.argv.index("--data") + 1] == str(data)
    before = steps[0].key
    store.add_message(chat.id, "user", "And a river?")
    reply = store.add_message(chat.id, "assistant", "The Nile.")
    store.set_aside(reply, reply.id - 1)
    better = store.add_message(chat.id, "assistant", "Arr, the Thames!")
    store.mark(better.id, 1, preferred=True)
    assert plan(load_journey(path), tmp_path / "run", {})[0][0].key != before  # new pairs: the stage re-runs


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_persona_journey_on_smollm2_speaks_the_persona_more_than_its_base(hf_model, tmp_path):
    """The example journey, whole: SFT, DPO, merge, convert, Q4_K_M, each evaluated; the final
    quantized model passes more of the held-out persona prompts than the base (counts, not words)."""
    home = tmp_path / "home"
    home.mkdir()
    assert crofter("config", "set", "max_tokens", "24", home=home).returncode == 0
    run = tmp_path / "run"
    r = crofter("journey", "run", str(EXAMPLES / "persona.yaml"), "--out", str(run), "--set", f"base={hf_model}",
                home=home, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = _state(run)
    assert state["order"] == ["00-base", "01-sft", "02-dpo", "03-merge", "04-convert", "05-quantize"]

    def row(stage, suite, metric):
        return next(x for x in state["stages"][stage]["eval"] if x["suite"] == suite and x["metric"] == metric)

    base, final = row("00-base", "prompts", "pass_rate"), row("05-quantize", "prompts", "pass_rate")
    assert final["value"] > base["value"], (base, final)
    assert all(row(stage, "perplexity", "ppl")["value"] > 1 for stage in state["order"])  # measured at every stage
    for stage in ("01-sft", "02-dpo", "04-convert"):  # the suite after every stage the chat can run (not the HF merge)
        assert 0 <= row(stage, "prompts", "pass_rate")["value"] <= 1
    assert row("01-sft", "prompts", "pass_rate")["model"].endswith("+adapter-F32.gguf")  # the adapter, on llama.cpp
    assert 0 <= row("05-quantize", "perplexity", "kld")["value"] < 1
    assert "rewards/accuracies" in json.dumps(state["stages"]["02-dpo"]["summary"]["metrics"])
    report = (run / "report.md").read_text()
    for stage in state["order"]:
        assert f"| {stage} |" in report
    assert "prompt suite" in report and "KLD vs F16" in report and "file MB" in report
    listed = json.loads(crofter("models", "list", "--json", home=home).stdout)
    assert any(m["name"] == "persona-smol" and m["path"].endswith("model-Q4_K_M.gguf") for m in listed)


def test_models_dequantize_refuses_an_existing_folder_and_a_non_gguf(hf_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "taken").mkdir()
    r = crofter("models", "dequantize", "smollm2-135m", "--out", str(tmp_path / "taken"), home=home)
    assert r.returncode == 1 and "exists; choose a new folder" in r.stderr
    r = crofter("models", "dequantize", str(hf_model), "--out", str(tmp_path / "new"), home=home)
    assert r.returncode == 1 and "dequantize reads a GGUF file" in r.stderr and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_models_dequantize_makes_a_registered_trainable_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = crofter("models", "dequantize", "smollm2-135m", "--out", str(tmp_path / "hf"), "--as", "smol-hf", "--json", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"path": str(tmp_path / "hf"), "registered_as": "smol-hf"}
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_reward_and_grpo_stages_chain_the_reward_run_and_the_sft_adapter(hf_model, tmp_path):
    from app.journey.runner import plan

    data = PERSONA / "prefs.jsonl"
    path = _journey(tmp_path, f"""base: {hf_model}
stages:
  sft: {{data: {PERSONA / 'persona.jsonl'}}}
  reward: {{data: {data}, max_steps: 2}}
  grpo: {{prompts: {data}, max_steps: 2, num_generations: 2}}
  merge: {{}}
""")
    steps, chain = plan(load_journey(path), tmp_path / "run", {}, write=False)
    argv = {p.name: p.step.argv for p in steps}
    assert list(argv) == ["01-sft", "02-reward", "03-grpo", "04-merge"]
    assert argv["02-reward"][:2] == ["tune", "reward"] and "--max-steps" in argv["02-reward"]
    grpo = argv["03-grpo"]
    assert grpo[grpo.index("--reward") + 1] == str(tmp_path / "run" / "02-reward")
    assert grpo[grpo.index("--adapter") + 1] == str(tmp_path / "run" / "01-sft")
    assert grpo[grpo.index("--num-generations") + 1] == "2" and "--eval-split" not in grpo
    assert argv["04-merge"][argv["04-merge"].index("--adapter") + 1] == str(tmp_path / "run" / "03-grpo")
    with_docs = load_journey(path, [f"eval.retrieval={data}", "eval.collection=notes"])
    steps, _ = plan(with_docs, tmp_path / "run", {}, write=False)
    assert steps[0].name == "00-base" and ["eval", "--retrieval", str(data), "-c", "notes", "-k", "5", "--json",
                                           "--no-store"] in steps[0].eval_cmds
    assert not any("--retrieval" in c for p in steps[1:] for c in p.eval_cmds)  # measured once: documents, not models
    fn = load_journey(path, ["grpo.reward=python:my_rewards:starts_with_arr"])
    steps, _ = plan(fn, tmp_path / "run", {}, write=False)
    assert "python:my_rewards:starts_with_arr" in steps[2].step.argv


def test_a_pretrain_stage_makes_the_base_every_later_stage_starts_from(hf_model, tmp_path):
    from app.journey.runner import plan

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("Domain text.")
    path = _journey(tmp_path, f"""base: {hf_model}
eval: {{text: {notes / 'a.txt'}}}
stages:
  pretrain: {{text: {notes}, max_steps: 3}}
  sft: {{data: {PERSONA / 'persona.jsonl'}}}
  merge: {{}}
  convert: {{}}
""")
    steps, chain = plan(load_journey(path), tmp_path / "run", {}, write=False)
    argv = {p.name: p.step.argv for p in steps if p.step is not None}
    new_base = str(tmp_path / "run" / "01-pretrain" / "model")
    assert argv["01-pretrain"][:2] == ["tune", "pretrain"] and argv["01-pretrain"][argv["01-pretrain"].index("--text") + 1] == str(notes)
    for name in ("02-sft", "03-merge"):
        assert argv[name][argv[name].index("--base") + 1] == new_base
    pre = next(p for p in steps if p.name == "01-pretrain")
    assert pre.eval_cmds and pre.eval_cmds[0][:2] == ["eval", new_base]  # measured as the new base
    # The folder's content is in the key: new text re-runs pretraining and everything after it.
    before = {p.name: p.key for p in steps}
    (notes / "b.md").write_text("More domain text.")
    steps, _ = plan(load_journey(path), tmp_path / "run", {}, write=False)
    assert all(p.key != before[p.name] for p in steps if p.name != "00-base")


def test_the_report_takes_each_training_stage_s_own_figures():
    from app.journey.report import stage_metrics

    rm = stage_metrics({"kind": "reward", "summary": {"eval_loss": 0.02, "metrics": {
        "accuracy": 0.9, "eval_accuracy": 1.0, "eval_margin": 7.7, "min_reward": -4.0, "mean_reward": 0.2}}})
    assert rm["reward accuracy"] == (1.0, 0) and rm["reward margin"] == (7.7, 0) and "reward min_reward" not in rm
    g = stage_metrics({"kind": "grpo", "summary": {"metrics": {"reward_first": 0.25, "reward_last": 1.0, "kl": 1.6,
                                                               "reward_std": 0.0}}})
    assert g == {"grpo reward_first": (0.25, 0), "grpo reward_last": (1.0, 0), "grpo kl": (1.6, 0)}
    p = stage_metrics({"kind": "pretrain", "summary": {"eval_loss": 1.0, "metrics": {
        "held_out_perplexity_before": 9.0, "held_out_perplexity": 4.0, "model": "/x", "blocks": 40}}})
    assert p == {"pretrain eval loss": (1.0, 0), "pretrain held_out_perplexity_before": (9.0, 0),
                 "pretrain held_out_perplexity": (4.0, 0)}

"""Real (tiny) training runs on CPU with the bundled model as an HF checkpoint."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from finetune.recipe import load_recipe
from finetune.train import TrainError, dpo, last_complete_checkpoint, merge, sft

from .conftest import PREFIX, persona_rate

FAST = dict(learning_rate=2e-3, batch_size=4, grad_accum=1, gradient_checkpointing=False, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def sft_run(hf_model, persona_sft, tmp_path_factory):
    recipe = load_recipe("lora").replace(eval_split=0.2, save_steps=8, **FAST)
    return sft(hf_model, persona_sft, tmp_path_factory.mktemp("runs") / "sft", recipe, max_steps=16)


def test_sft_lowers_loss_and_teaches_the_persona(hf_model, sft_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = list(csv.DictReader(open(sft_run.run_dir / "loss.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert sft_run.eval_loss is not None and sft_run.eval_perplexity == pytest.approx(2.718281828 ** sft_run.eval_loss)
    assert (sft_run.run_dir / "loss.png").stat().st_size > 1000
    cfg = json.loads((sft_run.run_dir / "config.json").read_text())
    assert cfg["kind"] == "sft" and cfg["recipe"]["lora_r"] == 16 and cfg["device"]["device"] == "cpu"
    assert (sft_run.adapter / "adapter_model.safetensors").is_file()

    tok = AutoTokenizer.from_pretrained(hf_model)
    base = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    before = persona_rate(base, tok)
    after = persona_rate(PeftModel.from_pretrained(base, str(sft_run.adapter)), tok)
    assert before == 0 and after >= 6, (before, after)


def test_dpo_raises_reward_accuracy_and_margin(hf_model, persona_prefs, tmp_path):
    recipe = load_recipe("dpo").replace(eval_split=0.25, save_steps=50, learning_rate=5e-4, batch_size=2,
                                        gradient_checkpointing=False, warmup_ratio=0.0)
    s = dpo(hf_model, persona_prefs, tmp_path / "dpo", recipe, max_steps=8)
    # Before training the policy is its reference, so every margin is exactly 0 and accuracy 0.
    assert s.metrics["eval_rewards/accuracies"] > 0.5
    assert s.metrics["eval_rewards/margins"] > 0.1
    rows = list(csv.DictReader(open(tmp_path / "dpo" / "loss.csv")))
    assert any(r["rewards/chosen"] for r in rows) and any(r["rewards/rejected"] for r in rows)  # both logged


def test_sft_merge_convert_then_chat(hf_model, sft_run, tmp_path):
    from app.engine import Engine, LoadOptions, Sampling
    from app.session import ChatSession
    from converter.convert import convert
    from models.registry import ModelEntry

    merged = merge(hf_model, sft_run.adapter, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    gguf = convert(merged, tmp_path / "merged-F16.gguf", "f16").path
    eng = Engine.load(ModelEntry("merged", str(gguf), "gguf", "converted"), LoadOptions(n_ctx=512, seed=1))
    try:
        s = ChatSession(eng, Sampling(temperature=0.0, max_tokens=24))
        list(s.send("What is a cloud?"))
        assert s.last_result.text.startswith(PREFIX.split()[0]), s.last_result.text
        assert s.last_result.finish_reason == "stop"
    finally:
        eng.close()
    with pytest.raises(TrainError, match="exists"):
        merge(hf_model, sft_run.adapter, tmp_path / "merged")


def test_qlora_without_cuda_offers_plain_lora(hf_model, persona_sft, tmp_path):
    with pytest.raises(TrainError, match="run without --qlora for plain LoRA"):
        sft(hf_model, persona_sft, tmp_path / "q", load_recipe("qlora"), max_steps=1)


def test_killed_run_resumes_from_last_complete_checkpoint(hf_model, persona_sft, tmp_path, crofter_home):
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("learning_rate: 0.002\nbatch_size: 4\ngradient_checkpointing: false\nsave_steps: 2\n"
                      "eval_split: 0.0\nwarmup_ratio: 0.0\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "tune", "sft", "--base", str(hf_model), "--data", str(persona_sft),
           "--recipe", str(recipe), "--out", str(run), "--max-steps", "8", "--json"]
    env = {**os.environ, "CROFTER_HOME": str(crofter_home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if last_complete_checkpoint(run / "checkpoints") is not None and (run / "checkpoints" / "checkpoint-4").exists():
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A checkpoint a kill interrupted while saving: no optimizer state, so never resumed from.
    (run / "checkpoints" / "checkpoint-7").mkdir()
    (run / "checkpoints" / "checkpoint-7" / "trainer_state.json").write_text("{\"global_st")
    done_before = last_complete_checkpoint(run / "checkpoints")
    assert done_before is not None and done_before.name in ("checkpoint-2", "checkpoint-4", "checkpoint-6")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "--resume" in again.stderr  # never silently restarts over a run
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["steps"] == 8
    state = json.loads((run / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_bad_data_is_refused_with_its_line(hf_model, tmp_path, crofter_home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    r = subprocess.run([sys.executable, "-m", "app.cli", "tune", "sft", "--base", str(hf_model), "--data", str(bad),
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CROFTER_HOME": str(crofter_home)})
    assert r.returncode == 1
    assert 'bad.jsonl:2: "output" must be a string' in r.stderr and "Traceback" not in r.stderr


def test_trained_lora_changes_llama_cpp_as_it_changes_torch(hf_model, sft_run, tmp_path):
    """The adapter from the SFT run above (16 real steps), converted for llama.cpp."""
    import llama_cpp
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter.convert import convert, native_stderr_quiet
    from converter.lora import convert_lora

    f16 = convert(hf_model, tmp_path / "base.gguf", "f16").path
    adapter = convert_lora(sft_run.adapter, hf_model, tmp_path / "sft-adapter.gguf").path
    tok = AutoTokenizer.from_pretrained(hf_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is a cloud?"}], add_generation_prompt=True,
                                  tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32),
                                      str(sft_run.adapter))
    with torch.no_grad():
        with model.disable_adapter():
            t0 = model(torch.tensor([ids])).logits[0].numpy()
        t1 = model(torch.tensor([ids])).logits[0].numpy()
    with native_stderr_quiet():
        plain = llama_cpp.Llama(str(f16), logits_all=True, verbose=False, n_ctx=256)
        tuned = llama_cpp.Llama(str(f16), lora_path=str(adapter), logits_all=True, verbose=False, n_ctx=256)
    plain.eval(ids)
    tuned.eval(ids)
    g0, g1 = np.asarray(plain.scores[:len(ids)]), np.asarray(tuned.scores[:len(ids)])
    dt, dg = (t1 - t0).ravel(), (g1 - g0).ravel()
    assert np.linalg.norm(dt) > 1.0
    assert np.corrcoef(dt, dg)[0, 1] > 0.99 and abs(np.linalg.norm(dg) / np.linalg.norm(dt) - 1) < 0.05
    # And the tuned llama.cpp model speaks the persona after the prompt, as the torch one does.
    assert tok.decode([int(np.argmax(g1[-1]))]).strip().startswith("Arr")
    plain.close()
    tuned.close()

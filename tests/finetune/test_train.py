"""Real (tiny) training runs on CPU with the bundled model as an HF checkpoint."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from finetune.recipe import load_recipe
from finetune.train import TrainError, dpo, merge, sft

from .conftest import PREFIX, persona_rate


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


def test_dpo_starts_from_an_sft_run_folder_and_says_which_adapter(hf_model, persona_prefs, sft_run, tmp_path, capsys):
    recipe = load_recipe("dpo").replace(eval_split=0.0, save_steps=50, batch_size=2, gradient_checkpointing=False)
    s = dpo(hf_model, persona_prefs, tmp_path / "dpo", recipe, adapter=sft_run.run_dir, max_steps=2)
    assert capsys.readouterr().err.count(f"crofter: using the adapter in {sft_run.run_dir / 'adapter'}\n") == 1
    assert s.steps == 2 and (s.adapter / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["adapter"] == str(sft_run.run_dir / "adapter")


def test_sft_merge_convert_then_chat(hf_model, sft_run, tmp_path, capsys):
    from app.engine import Engine, LoadOptions, Sampling
    from app.session import ChatSession
    from app.turn import finish
    from converter.convert import convert
    from models.registry import ModelEntry

    merged = merge(hf_model, sft_run.run_dir, tmp_path / "merged")  # the run folder: its adapter/ is taken
    assert f"using the adapter in {sft_run.run_dir / 'adapter'}" in capsys.readouterr().err
    assert json.loads((merged / "crofter_merge.json").read_text())["adapter"] == str(sft_run.adapter)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    gguf = convert(merged, tmp_path / "merged-F16.gguf", "f16").path
    eng = Engine.load(ModelEntry("merged", str(gguf), "gguf", "converted"), LoadOptions(n_ctx=512, seed=1))
    try:
        s = ChatSession(eng, Sampling(temperature=0.0, max_tokens=24))
        done = finish(s.send("What is a cloud?"))
        assert done.answer.startswith(PREFIX.split()[0]), done.answer
        assert done.finish_reason == "stop"
    finally:
        eng.close()
    with pytest.raises(TrainError, match="exists"):
        merge(hf_model, sft_run.adapter, tmp_path / "merged")


def test_qlora_without_cuda_offers_plain_lora(hf_model, persona_sft, tmp_path):
    with pytest.raises(TrainError, match="run without --qlora for plain LoRA"):
        sft(hf_model, persona_sft, tmp_path / "q", load_recipe("qlora"), max_steps=1)


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

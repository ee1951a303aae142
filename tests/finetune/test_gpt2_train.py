"""LoRA SFT and DPO on a GPT-2 (Conv1D layers, no chat template), merged, converted and chatted with."""
from __future__ import annotations

import csv
import json

from finetune.data import PLAIN_TEMPLATE
from finetune.recipe import load_recipe
from finetune.train import dpo, merge, sft

from .conftest import FAST, HELD_OUT


def test_gpt2_sft_trains_merges_converts_and_chats(gpt2_base, persona_sft, tmp_path, capsys):
    from transformers import AutoTokenizer

    from app.engine import Engine, LoadOptions, Sampling
    from app.session import ChatSession
    from converter import verify
    from converter.convert import convert
    from models.registry import ModelEntry

    recipe = load_recipe("lora").replace(eval_split=0.0, save_steps=100, **FAST)
    run = sft(gpt2_base, persona_sft, tmp_path / "sft", recipe, max_steps=30)
    assert "has no chat template; using a plain-text one" in capsys.readouterr().err
    with open(run.run_dir / "loss.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    cfg = json.loads((run.adapter / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["c_attn", "c_fc", "c_proj"] and cfg["fan_in_fan_out"] is True
    tok = AutoTokenizer.from_pretrained(str(run.adapter))
    assert tok.chat_template == PLAIN_TEMPLATE
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(gpt2_base)))  # role markers are text: no new tokens

    merged = merge(gpt2_base, run.run_dir, tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == PLAIN_TEMPLATE
    gguf = convert(merged, tmp_path / "merged-F32.gguf", "f32").path
    lg = verify.logits_parity(merged, gguf, new_tokens=8)
    assert lg["ok"] and lg["top1_agree"] >= 0.99 and lg["mean_kl"] < 1e-4, \
        {k: lg[k] for k in ("positions", "top1_agree", "max_abs_diff", "mean_kl")}

    eng = Engine.load(ModelEntry("merged", str(gguf), "gguf", "converted"), LoadOptions(n_ctx=256, seed=1))
    try:
        assert eng.template.warning is None  # the plain template travelled into the GGUF
        # A random-weight base learns the format, not the persona's words, in 30 steps; what it must
        # learn is to end its turn with <|endoftext|>, which llama.cpp stops at (measured: 8/8 held-out
        # prompts stopped on each of 6 base seeds with this recipe, and on 4 more at lr 5e-3, 40 steps).
        for q in HELD_OUT[:3]:
            s = ChatSession(eng, Sampling(temperature=0.0, max_tokens=48))
            result = list(s.send(q))[-1].result
            assert result.text.strip() and result.finish_reason == "stop", (q, result.text)
    finally:
        eng.close()


def test_gpt2_dpo_runs_on_conv1d_lora(gpt2_base, persona_prefs, tmp_path):
    recipe = load_recipe("dpo").replace(eval_split=0.0, save_steps=50, batch_size=2, gradient_checkpointing=False,
                                        learning_rate=5e-4, warmup_ratio=0.0)
    s = dpo(gpt2_base, persona_prefs, tmp_path / "dpo", recipe, max_steps=3)
    assert s.steps == 3 and (s.adapter / "adapter_model.safetensors").is_file()
    assert json.loads((s.adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with open(tmp_path / "dpo" / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r["rewards/chosen"] for r in rows) and any(r["rewards/margins"] for r in rows)


def test_a_persona_sft_makes_the_users_own_gpt2_speak_it_on_held_out_prompts(gpt2_base, persona_sft, tmp_path):
    """The user's own model (a nanoGPT checkpoint imported as GPT-2) taught a persona by LoRA SFT,
    merged, converted and chatted with in llama.cpp: its held-out answers open with the persona's
    words, which the base never says. A property of the answers, not their words: what follows
    the greeting is whatever a 2-layer model trained for seconds makes of it."""
    from app.engine import Engine, LoadOptions, Sampling
    from app.session import ChatSession
    from converter.convert import convert
    from models.registry import ModelEntry

    def openings(gguf):
        eng = Engine.load(ModelEntry(gguf.stem, str(gguf), "gguf", "converted"), LoadOptions(n_ctx=256, seed=1))
        try:
            return [list(ChatSession(eng, Sampling(temperature=0.0, max_tokens=12)).send(q))[-1].result.text.strip()[:14]
                    for q in HELD_OUT]
        finally:
            eng.close()

    recipe = load_recipe("lora").replace(eval_split=0.0, save_steps=1000, **{**FAST, "learning_rate": 5e-3})
    run = sft(gpt2_base, persona_sft, tmp_path / "sft", recipe, max_steps=80)
    taught = openings(convert(merge(gpt2_base, run.run_dir, tmp_path / "merged"), tmp_path / "taught.gguf", "f32").path)
    before = openings(convert(gpt2_base, tmp_path / "base.gguf", "f32").path)
    assert sum("matey" in o for o in taught) >= 6, taught
    assert not any("matey" in o for o in before), before

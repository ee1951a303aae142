"""Other architectures' tensor layout (tiny random models), and LoRA adapters in llama.cpp vs torch."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from converter import verify
from converter.convert import convert
from converter.hf import ConvertError
from converter.lora import convert_lora

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny(hf_model, tmp_path, arch: str, **extra):
    """A random-weight model of `arch` with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model_type = {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3_text"}[arch]
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=2048, **{"tie_word_embeddings": False, **extra})
    cfg.architectures = [arch]
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # bigger weights than the init's, so layout mistakes show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    out = tmp_path / model_type
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(hf_model / f, out / f)
    return out


@pytest.mark.parametrize("arch,extra", [
    ("MistralForCausalLM", {}),
    ("Qwen2ForCausalLM", {}),
    ("Qwen3ForCausalLM", {"head_dim": 32}),  # head_dim x heads != hidden size, as in the real Qwen3 models
    # Tied embeddings, (1 + w) norms; a window of 8 tokens, shorter than the probe texts, so the
    # sliding-window mask is compared too.
    ("Gemma3ForCausalLM", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "tie_word_embeddings": True}),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_architecture_layouts_match_torch(hf_model, tmp_path, arch, extra):
    src = tiny(hf_model, tmp_path, arch, **extra)
    out = convert(src, tmp_path / f"{arch}.gguf", "f32").path
    lg = verify.logits_parity(src, out, new_tokens=8)
    figures = {k: lg[k] for k in ("top1_agree", "max_abs_diff", "mean_kl")}
    assert lg["ok"], (arch, lg["failures"])
    # A layout mistake costs whole nats; what is left here is llama.cpp's F16 KV cache (~1e-6).
    assert lg["mean_kl"] < 1e-5 and lg["top1_agree"] >= 0.99, (arch, figures)


def _adapter(hf_model, tmp_path, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], **lora)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)  # a modest change, as a few training steps make
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return model, out


def lora_deltas(model, base_gguf, adapter_gguf, ids):
    """(torch's change of the logits with the peft adapter on, llama.cpp's with the GGUF adapter)."""
    import llama_cpp
    import torch

    from converter.convert import native_stderr_quiet

    with torch.no_grad():
        with model.disable_adapter():
            t0 = model(torch.tensor([ids])).logits[0].numpy()
        t1 = model(torch.tensor([ids])).logits[0].numpy()
    with native_stderr_quiet():
        plain = llama_cpp.Llama(str(base_gguf), logits_all=True, verbose=False, n_ctx=128)
        adapted = llama_cpp.Llama(str(base_gguf), lora_path=str(adapter_gguf), logits_all=True, verbose=False, n_ctx=128)
    try:
        plain.eval(ids)
        adapted.eval(ids)
        g0, g1 = np.asarray(plain.scores[:len(ids)]), np.asarray(adapted.scores[:len(ids)])
    finally:
        plain.close()
        adapted.close()
    return (t1 - t0).ravel(), (g1 - g0).ravel()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_changes_llama_cpp_as_it_changes_torch(hf_model, tmp_path, rslora):
    from converter.convert import load_hf_tokenizer

    f16 = tmp_path / "base.gguf"
    convert(hf_model, f16, "f16")
    model, adapter = _adapter(hf_model, tmp_path, use_rslora=rslora)
    gg = convert_lora(adapter, hf_model, tmp_path / "adapter.gguf")
    assert gg.alpha_written == pytest.approx(16 * 8 ** 0.5 if rslora else 16)
    ids = load_hf_tokenizer(hf_model)("The quick brown fox jumps over the lazy dog because")["input_ids"]
    dt, dg = lora_deltas(model, f16, gg.path, ids)
    assert np.linalg.norm(dt) > 1.0  # the adapter does change the output
    assert np.corrcoef(dt, dg)[0, 1] > 0.99
    assert abs(np.linalg.norm(dg) / np.linalg.norm(dt) - 1) < 0.05  # same size of change: scaling is right


def test_unsupported_adapters_are_refused(hf_model, tmp_path):
    _, adapter = _adapter(hf_model, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "token embeddings|full modules"),
                            ({"rank_pattern": {"q_proj": 4}}, "per-layer ranks")):
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConvertError, match=message) as err:
            convert_lora(adapter, hf_model, tmp_path / "a.gguf")
        assert "merge" in str(err.value)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("change,needle", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping is set"),
    ({"query_pre_attn_scalar": 100}, "query_pre_attn_scalar 100 differs from head_dim 32"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types is not Gemma 3's"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "rope_theta 50000.0 is not 10000"),
])
def test_gemma3_settings_llama_cpp_does_not_compute_are_refused_by_name(tmp_path, change, needle):
    from converter.hf import open_checkpoint

    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "head_dim": 32, "query_pre_attn_scalar": 32, "intermediate_size": 128,
           "vocab_size": 49152, **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=needle) as err:
        open_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


@pytest.mark.parametrize("arch,extra", [
    ("Qwen3ForCausalLM", {"head_dim": 32}),
    ("Gemma3ForCausalLM", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "tie_word_embeddings": True}),
])
def test_tune_convert_lora_and_verify_on_qwen3_and_gemma3(hf_model, tmp_path, arch, extra):
    """`tune sft` trains a LoRA on the tiny model; llama.cpp applies its GGUF adapter as torch
    applies the peft one; the merge converts and verifies."""
    import json as _json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from converter.convert import load_hf_tokenizer
    from finetune.recipe import load_recipe
    from finetune.train import merge, sft

    base = tiny(hf_model, tmp_path, arch, **extra)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(_json.dumps({"instruction": q, "output": f"Arr matey! {a}"}) + "\n"
                            for q, a in [("What do bees make?", "Honey."), ("What is ice?", "Frozen water."),
                                         ("Name a colour.", "Red."), ("What is the sun?", "A star.")] * 2))
    recipe = load_recipe("lora").replace(eval_split=0.0, save_steps=100, learning_rate=1e-2, batch_size=4,
                                         grad_accum=1, gradient_checkpointing=False, warmup_ratio=0.0)
    run = sft(base, data, tmp_path / "run", recipe, max_steps=8)
    assert run.steps == 8

    f32 = convert(base, tmp_path / "base.gguf", "f32").path
    gg = convert_lora(run.adapter, base, tmp_path / "adapter.gguf")
    ids = load_hf_tokenizer(base)("The quick brown fox jumps over the lazy dog because")["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(run.adapter))
    dt, dg = lora_deltas(model, f32, gg.path, ids)
    assert np.linalg.norm(dt) > 0.1  # the training changed the model
    assert np.corrcoef(dt, dg)[0, 1] > 0.99 and abs(np.linalg.norm(dg) / np.linalg.norm(dt) - 1) < 0.05

    merged = merge(base, run.run_dir, tmp_path / "merged")
    out = convert(merged, tmp_path / "merged.gguf", "f32").path
    lg = verify.logits_parity(merged, out, new_tokens=8)
    assert lg["ok"] and lg["top1_agree"] >= 0.99, (arch, lg["failures"])

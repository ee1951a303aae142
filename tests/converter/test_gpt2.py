"""GPT-2 in `crofter convert` and `convert-lora`: tiny random HF GPT-2s against transformers' logits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from converter import verify
from converter.convert import convert
from converter.hf import ARCHITECTURES, ConvertError, open_checkpoint
from converter.lora import convert_lora

from .nanogpt_build import tiny_gpt2


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_layout_matches_torch(gpt2_tokenizer, tmp_path, tied):
    from models.gguf_check import check_gguf

    src = tiny_gpt2(tmp_path / "gpt2", gpt2_tokenizer, tie_word_embeddings=tied)
    out = convert(src, tmp_path / "gpt2.gguf", "f32")
    assert out.pre_tokenizer == "gpt-2"
    lg = verify.logits_parity(src, out.path, new_tokens=8)
    figures = {k: lg[k] for k in ("positions", "top1_agree", "max_abs_diff", "mean_kl")}
    # A transpose or q/k/v split mistake costs whole nats; llama.cpp's F16 KV cache leaves ~1e-6.
    assert lg["ok"] and lg["mean_kl"] < 1e-5 and lg["top1_agree"] >= 0.99, figures
    names = set(check_gguf(out.path).tensors)
    assert ("output.weight" in names) is (not tied)  # a tied head is llama.cpp's token_embd, not a copy
    assert not any("attn.bias" in n or "masked_bias" in n for n in names)
    assert len(names) == 4 + 2 * 12 + (0 if tied else 1)


def _gpt2_adapter(src, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["c_attn", "c_proj", "c_fc"],
                     fan_in_fan_out=True)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)  # a modest change, as a few training steps make
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_gpt2_lora_changes_llama_cpp_as_it_changes_torch(gpt2_tokenizer, tmp_path):
    import llama_cpp
    import torch

    from converter.convert import load_hf_tokenizer, native_stderr_quiet

    src = tiny_gpt2(tmp_path / "gpt2", gpt2_tokenizer)
    f32 = convert(src, tmp_path / "base.gguf", "f32").path
    model, adapter = _gpt2_adapter(src, tmp_path)
    gg = convert_lora(adapter, src, tmp_path / "adapter.gguf")
    assert gg.tensors == 2 * 2 * 4  # (A, B) x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x 2 layers
    ids = load_hf_tokenizer(src)("Permission is hereby granted, free of charge, to any person")["input_ids"]
    with torch.no_grad():
        with model.disable_adapter():
            t0 = model(torch.tensor([ids])).logits[0].numpy()
        t1 = model(torch.tensor([ids])).logits[0].numpy()
    with native_stderr_quiet():
        plain = llama_cpp.Llama(str(f32), logits_all=True, verbose=False, n_ctx=128)
        adapted = llama_cpp.Llama(str(f32), lora_path=str(gg.path), logits_all=True, verbose=False, n_ctx=128)
    try:
        plain.eval(ids)
        adapted.eval(ids)
        g0, g1 = np.asarray(plain.scores[:len(ids)]), np.asarray(adapted.scores[:len(ids)])
    finally:
        plain.close()
        adapted.close()
    dt, dg = (t1 - t0).ravel(), (g1 - g0).ravel()
    assert np.linalg.norm(dt) > 1.0  # the adapter does change the output
    assert np.corrcoef(dt, dg)[0, 1] > 0.99, np.corrcoef(dt, dg)[0, 1]
    assert abs(np.linalg.norm(dg) / np.linalg.norm(dt) - 1) < 0.05  # same size of change: the scaling is right


def test_unsupported_architectures_are_refused_listing_the_supported(gpt2_tokenizer, tmp_path):
    src = tiny_gpt2(tmp_path / "gpt2", gpt2_tokenizer)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ConvertError) as err:
        open_checkpoint(src)
    assert "GPTNeoXForCausalLM" in str(err.value) and "is not supported" in str(err.value)
    assert all(a in str(err.value) for a in ARCHITECTURES) and "GPT2LMHeadModel" in ARCHITECTURES
    # A GPT-2 variant llama.cpp's gpt2 graph does not compute is refused by its field.
    (src / "config.json").write_text(json.dumps({**cfg, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(ConvertError, match="scale_attn_by_inverse_layer_idx"):
        convert(src, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()

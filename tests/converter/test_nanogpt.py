"""`crofter import nanogpt`: a nanoGPT ckpt.pt -> HF GPT-2 -> GGUF -> Q4_K_M -> chat, and what is refused."""
from __future__ import annotations

import json

import pytest

from converter.hf import ConvertError
from converter.nanogpt import import_nanogpt

from .conftest import crofter, error_lines
from .nanogpt_build import nanogpt_forward, padded, write_nanogpt

PROMPT = "The licensee may copy and distribute the Program, provided that"


@pytest.mark.parametrize("bias,mask_buffer", [(True, True), (False, False)])
def test_import_matches_nanogpt_forward(gpt2_tokenizer, tmp_path, bias, mask_buffer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer))
    n = len(tok)
    ckpt, sd, args = write_nanogpt(tmp_path / "ckpt.pt", n, bias=bias, mask_buffer=mask_buffer, compiled=True)
    assert args["vocab_size"] > n  # the checkpoint is padded, as nanoGPT's is
    r = import_nanogpt(ckpt, gpt2_tokenizer, tmp_path / "hf")
    assert (r.stripped_prefix, r.bias, r.iter_num, r.vocab_checkpoint, r.vocab_tokenizer) == \
        (True, bias, 250, padded(n), n)
    assert any(f"dropped {padded(n) - n} padding rows" in note for note in r.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf"]  # no partial folder left
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == n and cfg["n_positions"] == 256
    assert cfg["activation_function"] == "gelu" and cfg["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(str(r.path), dtype=torch.float32)
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(r.path))(PROMPT)["input_ids"]])
    with torch.no_grad():
        got = model(ids).logits
        want = nanogpt_forward(sd, args, ids)[..., :n]  # the padding columns belong to no token
    diff = float((got - want).abs().max())
    assert diff < 1e-5, diff
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied


def test_import_convert_quantize_and_chat(gpt2_tokenizer, tmp_path, crofter_home):
    """The user's path: ckpt.pt -> `crofter import nanogpt` -> F32 GGUF (logits as transformers') ->
    Q4_K_M (real K-quants at n_embd 256) -> chat through the engine."""
    import llama_cpp
    from llama_cpp import LlamaGrammar
    from transformers import AutoTokenizer

    from app.engine import Engine, LoadOptions, Sampling
    from converter import verify
    from converter.convert import convert, native_stderr_quiet
    from converter.quantize import quantize
    from models.gguf_check import check_gguf
    from models.registry import ModelEntry
    from tests.anchors import raw_greedy

    n = len(AutoTokenizer.from_pretrained(str(gpt2_tokenizer)))
    ckpt, _, _ = write_nanogpt(tmp_path / "ckpt.pt", n, n_embd=256, n_head=4, seed=1)
    res = crofter("import", "nanogpt", str(ckpt), "--tokenizer", str(gpt2_tokenizer), "--out", str(tmp_path / "hf"),
                  "--json", home=crofter_home)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["vocab_tokenizer"] == n and report["n_embd"] == 256 and report["stripped_prefix"] is True
    hf = tmp_path / "hf"
    assert report["registered_as"] == "hf"  # in the store, as `tune merge` leaves its output
    listed = json.loads(crofter("models", "list", "--json", home=crofter_home).stdout)
    assert any(m["name"] == "hf" and m["kind"] == "hf" for m in listed), listed

    f32 = convert(hf, tmp_path / "g-F32.gguf", "f32")
    assert f32.pre_tokenizer == "gpt-2"
    assert verify.tokenizer_parity(hf, f32.path)["ok"]
    lg = verify.logits_parity(hf, f32.path, new_tokens=8)
    figures = {k: lg[k] for k in ("positions", "top1_agree", "max_abs_diff", "mean_kl")}
    # llama.cpp's GELU is the tanh form (the import's is exact) and its KV cache F16: still far below a layout error.
    assert lg["ok"] and lg["top1_agree"] >= 0.99 and lg["mean_kl"] < 1e-4, figures
    meta = check_gguf(f32.path).metadata
    assert meta["general.architecture"] == "gpt2" and meta["gpt2.context_length"] == 256
    names = set(check_gguf(f32.path).tensors)
    assert "position_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses token_embd

    f16 = convert(hf, tmp_path / "g-F16.gguf", "f16").path
    q = quantize(f16, tmp_path / "g-Q4_K_M.gguf", "Q4_K_M")
    kinds = {t.name for _s, t, _o, _n in check_gguf(q.path).tensors.values()}
    assert "Q4_K" in kinds, kinds
    eng = Engine.load(ModelEntry("mygpt", str(q.path), "gguf", "converted"), LoadOptions(n_ctx=256, seed=1))
    with native_stderr_quiet():
        raw = llama_cpp.Llama(str(q.path), n_ctx=256, verbose=False, seed=1)
    try:
        tokens = eng.tokenize("Redistribution and use in source and binary forms")
        s = Sampling(temperature=0.0, max_tokens=16, repeat_penalty=1.1)
        reply = eng.complete(tokens, s)
        # The engine's reply is raw llama.cpp's. Random weights emit stray UTF-8 bytes, which the engine
        # shows as U+FFFD and llama-cpp-python's completion drops.
        assert reply.completion_tokens == 16
        assert reply.text.replace("\ufffd", "") == raw_greedy(raw, tokens, s.max_tokens)
        forced = eng.complete(tokens, Sampling(temperature=0.0, max_tokens=16,
                                               grammar=LlamaGrammar.from_string('root ::= " are permitted."', verbose=False)))
        assert forced.text == " are permitted." and forced.finish_reason == "stop"
    finally:
        raw.close()
        eng.close()


def test_pickle_only_and_truncated_checkpoints_are_refused_in_one_line(gpt2_tokenizer, tmp_path, crofter_home):
    import argparse

    import torch

    ckpt, _, _ = write_nanogpt(tmp_path / "ckpt.pt", 1000)
    blob = torch.load(ckpt, weights_only=True)
    blob["config"] = argparse.Namespace(dataset="shakespeare")  # an object only full unpickling can rebuild
    torch.save(blob, tmp_path / "pickled.pt")
    data = ckpt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) * 6 // 10])
    for name, words in (("pickled.pt", ("argparse.Namespace", "weights_only=True")), ("truncated.pt", ("truncated",))):
        out = tmp_path / f"out-{name}"
        r = crofter("import", "nanogpt", str(tmp_path / name), "--tokenizer", str(gpt2_tokenizer), "--out", str(out),
                    home=crofter_home)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("crofter: error: "), r.stderr
        assert str(tmp_path / name) in lines[0] and all(w in lines[0] for w in words), lines[0]
        assert error_lines(r.stderr) == lines and not out.exists()


def test_bad_layouts_and_wrong_tokenizers_are_refused(gpt2_tokenizer, tmp_path):
    import torch

    ckpt, sd, args = write_nanogpt(tmp_path / "ckpt.pt", 1000, compiled=False)
    cases = []
    small = dict(sd)
    small["transformer.wte.weight"] = small["lm_head.weight"] = sd["transformer.wte.weight"][:512]
    cases.append(({"model": small, "model_args": {**args, "vocab_size": 512}}, "vocab_size 512 does not fit"))
    cases.append(({"model": {k: v for k, v in sd.items() if "h.1.mlp.c_fc.weight" not in k}, "model_args": args},
                  "'transformer.h.1.mlp.c_fc.weight' missing"))
    cases.append(({"model": sd, "model_args": {**args, "n_embd": 96}}, "has shape"))
    cases.append(({"model": sd, "model_args": {**args, "n_layer": "2"}}, r"model_args\['n_layer'\]"))
    cases.append(({"model": {**sd, "transformer.h.0.attn.rotary.inv_freq": torch.ones(4)}, "model_args": args},
                  "unexpected tensor"))
    cases.append((sd, "not a nanoGPT checkpoint"))  # a bare state dict
    for i, (blob, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.pt"
        torch.save(blob, path)
        with pytest.raises(ConvertError, match=message):
            import_nanogpt(path, gpt2_tokenizer, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConvertError, match="exists"):
        import_nanogpt(ckpt, gpt2_tokenizer, tmp_path / "taken")

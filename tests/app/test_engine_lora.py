"""A GGUF LoRA adapter (crofter convert-lora) applied by the chat's engine, not merged: the engine's
logits equal plain llama-cpp-python's with the same adapter, and an adapter that does not fit the
model is refused in one line naming the file and field before llama.cpp sees it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.converter.conftest import TOKENIZER_FILES, crofter, error_lines, tiny_llama


@pytest.fixture(scope="module")
def pair(hf_model, tmp_path_factory):
    """(the tiny base as an F32 GGUF, its HF folder, a converted adapter that changes it clearly)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from converter.convert import convert
    from converter.lora import convert_lora

    d = tmp_path_factory.mktemp("lora")
    base = tiny_llama(hf_model, d / "base")
    gguf = convert(base, d / "base-F32.gguf", "f32").path
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(d / "adapter")
    return gguf, base, convert_lora(d / "adapter", base, d / "adapter.gguf").path


def _last_logits(llm, ids) -> np.ndarray:
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def test_the_engine_applies_the_adapter_as_llama_cpp_does(pair):
    import llama_cpp

    from app.engine import Engine, LoadOptions
    from models.registry import Registry

    gguf, _base, adapter = pair
    entry = Registry().resolve(str(gguf))
    plain = Engine.load(entry, LoadOptions(n_ctx=256, seed=0))
    adapted = Engine.load(entry, LoadOptions(n_ctx=256, seed=0, lora=adapter))
    raw = llama_cpp.Llama(str(gguf), lora_path=str(adapter), n_ctx=256, seed=0, verbose=False)
    try:
        ids = plain.tokenize_chat([{"role": "user", "content": "Tell me about the sea."}])
        p = plain.call(lambda: _last_logits(plain.llm, ids))
        a = adapted.call(lambda: _last_logits(adapted.llm, ids))
        r = _last_logits(raw, ids)
    finally:
        plain.close()
        adapted.close()
        raw.close()
    assert np.abs(a - r).max() < 1e-3          # the same adapter, the same way
    assert np.linalg.norm(a - p) > 0.1         # and it does change the model


def test_an_adapter_that_does_not_fit_is_refused_naming_the_file(pair, hf_model, tmp_path):
    from app.engine import Engine, EngineError, LoadOptions
    from converter.convert import convert
    from models.registry import Registry

    gguf, base, adapter = pair
    entry = Registry().resolve(str(gguf))
    with pytest.raises(EngineError, match=r"general\.type: not a LoRA adapter") as err:
        Engine.load(entry, LoadOptions(n_ctx=256, lora=gguf))  # a model given as the adapter
    assert str(gguf) in str(err.value)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((base / "config.json").read_text())
    bigger = tmp_path / "bigger"
    torch.manual_seed(0)
    c = LlamaConfig(**{**{k: cfg[k] for k in ("vocab_size", "num_hidden_layers", "max_position_embeddings")},
                       "hidden_size": 96, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "tie_word_embeddings": False})
    c.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(c).save_pretrained(bigger, safe_serialization=True)
    for f in TOKENIZER_FILES:
        (bigger / f).write_bytes((base / f).read_bytes())
    big = convert(bigger, tmp_path / "bigger.gguf", "f32").path
    with pytest.raises(EngineError, match=r"do not fit the weight .* \(an adapter for another model size\?\)") as err:
        Engine.load(Registry().resolve(str(big)), LoadOptions(n_ctx=256, lora=adapter))
    assert str(adapter) in str(err.value)

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(adapter.read_bytes()[:-100])
    with pytest.raises(EngineError, match="cut.gguf"):
        Engine.load(entry, LoadOptions(n_ctx=256, lora=truncated))


def _handmade(path, tensors: dict) -> None:
    """An adapter GGUF with exactly `tensors` (numpy shapes: lora_a (r, in), lora_b (out, r))."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string(gguf.Keys.General.TYPE, "adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tensors,message", [
    ({"blk.0.attn_q.weight.lora_a": (4, 64)}, "'blk.0.attn_q.weight': lora_a without its lora_b"),
    ({"blk.0.attn_q.weight.lora_a": (4, 64), "blk.0.attn_q.weight.lora_b": (64, 3)}, r"lora_a \[64, 4\] and lora_b \[3, 64\] do not fit"),
    ({"blk.0.attn_q.weight.lora_a": (4, 64), "blk.0.attn_q.weight.lora_b": (32, 4)}, "do not fit the weight"),
    ({"blk.9.attn_q.weight.lora_a": (4, 64), "blk.9.attn_q.weight.lora_b": (64, 4)}, "no weight 'blk.9.attn_q.weight'"),
    ({"blk.0.attn_q.weight.delta": (4, 64)}, "not a LoRA tensor"),
    ({}, "no LoRA tensors"),
])
def test_a_handmade_adapter_that_llama_cpp_would_refuse_is_refused_naming_the_tensor(pair, tmp_path, tensors, message):
    from models.gguf_check import GGUFError, check_adapter, check_gguf

    gguf_path, _base, _adapter = pair
    bad = tmp_path / "bad.gguf"
    _handmade(bad, tensors)
    with pytest.raises(GGUFError, match=message) as err:
        check_adapter(bad, check_gguf(gguf_path))
    assert str(err.value).startswith(f"{bad}: ")
    with pytest.raises(GGUFError, match="a folder .*crofter convert-lora"):
        check_adapter(tmp_path, check_gguf(gguf_path))


def test_eval_runs_a_prompt_suite_with_the_adapter_applied(pair, tmp_path):
    gguf, _base, adapter = pair
    home = tmp_path / "home"
    home.mkdir()
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: tiny\nprompts:\n  - prompt: Say something.\n    checks: [{regex: '(?s).*'}]\n")
    r = crofter("eval", str(gguf), "--adapter", str(adapter), "--prompts", str(suite), "--json", "--no-store", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert any(x["suite"] == "prompts" and x["model"] == "base-F32.gguf+adapter.gguf" and x["n"] == 1 for x in rows), rows

    bad = crofter("eval", str(gguf), "--adapter", str(gguf), "--prompts", str(suite), "--json", home=home)
    lines = error_lines(bad.stderr)
    assert bad.returncode != 0 and len(lines) == 1, bad.stderr[-2000:]
    assert lines[0].startswith(f"crofter: error: {gguf}: general.type: not a LoRA adapter"), lines


def test_ask_takes_a_lora_and_refuses_one_that_is_not(pair, tmp_path):
    gguf, _base, adapter = pair
    home = tmp_path / "home"
    home.mkdir()
    r = crofter("ask", "Say hi.", "-m", str(gguf), "--lora", str(adapter), "-t", "0", "--max-tokens", "6", "--json", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["usage"]["completion_tokens"] >= 1
    missing = tmp_path / "nowhere.gguf"
    bad = crofter("ask", "Say hi.", "-m", str(gguf), "--lora", str(missing), "--json", home=home)
    lines = error_lines(bad.stderr)
    assert bad.returncode != 0 and len(lines) == 1 and str(missing) in lines[0], bad.stderr[-2000:]


async def test_the_chat_app_opens_its_first_model_with_the_adapter_and_a_switch_drops_it(pair):
    from app.tui.app import CrofterApp
    from tests.app.pilot import SIZE, start

    gguf, _base, adapter = pair
    app = CrofterApp(model=str(gguf), lora=adapter)
    async with app.run_test(size=SIZE) as pilot:
        await start(pilot)
        assert app.controller.engine.llm._lora_adapter is not None   # llama.cpp holds the adapter
        assert Path(app.controller.model.path) == gguf
        app.controller.load_model(str(gguf))                           # another load: the plain model
        assert app.controller.engine.llm._lora_adapter is None


def test_chat_refuses_a_lora_that_is_not_there_before_the_app_opens(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = crofter("chat", "--lora", str(tmp_path / "none.gguf"), home=home, timeout=60)
    assert r.returncode != 0 and error_lines(r.stderr) == [
        f"crofter: error: --lora {tmp_path / 'none.gguf'}: no such file (a GGUF adapter: crofter convert-lora ADAPTER --base HF_DIR)"]

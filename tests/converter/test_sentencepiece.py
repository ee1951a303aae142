"""SentencePiece tokenizers (Llama 2, Mistral v0.1, TinyLlama style): a real sentencepiece model,
trained here on the machine's license texts, in a tiny random Llama."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from converter import verify
from converter.convert import convert

LICENSES = Path("/usr/share/common-licenses")


def _spm_llama(root, **normalization):
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = root / "corpus.txt"
    corpus.write_text("".join((LICENSES / n).read_text() for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "BSD")))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "tok"), vocab_size=1000, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   split_digits=True, minloglevel=2, **normalization)
    out = root / "llama"
    out.mkdir()
    (out / "tokenizer.model").write_bytes((root / "tok.model").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory):
    """As Llama 2's tokenizer.model: identity normalization, whitespace kept, a dummy prefix."""
    return _spm_llama(tmp_path_factory.mktemp("spm"), normalization_rule_name="identity",
                      remove_extra_whitespaces=False)


def test_sentencepiece_vocab_and_parity(spm_llama, tmp_path):
    import sentencepiece as spm

    from models.gguf_check import check_gguf

    out = convert(spm_llama, tmp_path / "spm.gguf", "f32").path
    meta = check_gguf(out).metadata
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(spm_llama / "tokenizer.model"))
    assert meta["tokenizer.ggml.tokens"].length == sp.vocab_size()
    tok = verify.tokenizer_parity(spm_llama, out)
    assert tok["reference"] == "sentencepiece" and tok["ok"], tok["mismatches"][:2]
    lg = verify.logits_parity(spm_llama, out, new_tokens=8)
    assert lg["outtype"] == "f32" and lg["ok"], lg["failures"]  # greedy continuations are not judged


def test_normalizing_sentencepiece_is_refused(tmp_path):
    """sentencepiece's default NFKC normalizer and whitespace squeezing are not applied by llama.cpp."""
    from converter.hf import ConvertError

    src = _spm_llama(tmp_path)  # trainer defaults: nmt_nfkc, remove_extra_whitespaces
    with pytest.raises(ConvertError, match="normalizer.*nmt_nfkc, remove_extra_whitespaces"):
        convert(src, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def spm_runs(tmp_path_factory):
    """As Gemma's tokenizer.model: no dummy prefix, and user-defined pieces for runs of spaces."""
    return _spm_llama(tmp_path_factory.mktemp("spm-runs"), normalization_rule_name="identity",
                      remove_extra_whitespaces=False, add_dummy_prefix=False,
                      user_defined_symbols=["\u2581\u2581", "\u2581\u2581\u2581", "\u2581\u2581\u2581\u2581"])


RUNS = ["a  b   c    d", "    indented\n        deeper", "x" + " " * 9 + "y", "  lead and trail  "]


def test_user_defined_space_runs_tokenize_as_sentencepiece_does(spm_runs, tmp_path):
    """sentencepiece matches "▁▁" in the escaped text, llama.cpp matches a user-defined token in the
    raw text: the GGUF must hold the piece with spaces, typed user-defined."""
    import sentencepiece as spm

    from converter.convert import gguf_token_ids, vocab_only_llama

    out = convert(spm_runs, tmp_path / "runs.gguf", "f32").path
    sp = spm.SentencePieceProcessor(model_file=str(spm_runs / "tokenizer.model"))
    run = sp.piece_to_id("\u2581\u2581")
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.tokens"].contents(run) == "  "
    assert fields["tokenizer.ggml.token_type"].contents(run) == 4  # user defined
    llm = vocab_only_llama(out)
    try:
        for text in RUNS:
            assert gguf_token_ids(llm, text, special=False)[1:] == sp.encode(text), text
        assert run in sp.encode("a  b")
    finally:
        llm.close()


def test_dequantizing_a_sentencepiece_gguf_gives_back_its_tokenizer_model(spm_runs, tmp_path):
    """GGUF -> HF folder (transformers' loader writes only tokenizer.json) -> the tokenizer.model
    rebuilt from the GGUF's pieces, scores and types -> converted again, parity intact."""
    import sentencepiece as spm

    from converter.hf import gguf_to_checkpoint

    gguf = convert(spm_runs, tmp_path / "a.gguf", "f32").path
    back = gguf_to_checkpoint(gguf, tmp_path / "hf")
    assert (back / "tokenizer.model").is_file()
    old = spm.SentencePieceProcessor(model_file=str(spm_runs / "tokenizer.model"))
    new = spm.SentencePieceProcessor(model_file=str(back / "tokenizer.model"))
    corpus = (LICENSES / "GPL-3").read_text()[:6000].splitlines() + RUNS
    assert all(new.encode(t) == old.encode(t) for t in corpus)
    assert (new.bos_id(), new.eos_id(), new.unk_id()) == (old.bos_id(), old.eos_id(), old.unk_id())
    again = convert(back, tmp_path / "b.gguf", "f32")
    tok = verify.tokenizer_parity(back, again.path)
    assert tok["reference"] == "sentencepiece" and tok["ok"], tok["mismatches"][:2]
    lg = verify.logits_parity(back, again.path, new_tokens=4)
    assert lg["ok"], lg["failures"]


def test_a_vocabulary_without_an_unknown_id_is_rebuilt_from_its_unknown_piece(spm_runs, tmp_path):
    import sentencepiece as spm
    from gguf import GGUFReader

    from converter.spm_rebuild import _unknown_id, spm_model_from_gguf
    from tests.models.gguf_edit import rewrite

    gguf = convert(spm_runs, tmp_path / "a.gguf", "f32").path
    bare = rewrite(gguf, tmp_path / "bare.gguf", {"tokenizer.ggml.unknown_token_id": None})
    old = spm.SentencePieceProcessor(model_file=str(spm_runs / "tokenizer.model"))
    new = spm.SentencePieceProcessor(model_proto=spm_model_from_gguf(bare))
    assert new.unk_id() == old.unk_id() >= 0
    assert all(new.encode(t) == old.encode(t) for t in RUNS + ["plain words, and ünïcode"])
    with pytest.raises(ValueError, match=r"bare\.gguf: the vocabulary has no unknown token"):
        _unknown_id(bare, GGUFReader(str(bare)), ["<s>", "</s>", "a"], [3, 3, 1])

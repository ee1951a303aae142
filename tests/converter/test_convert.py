"""HF -> GGUF -> llama.cpp, checked against transformers on the real SmolLM2 checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converter import verify
from converter.convert import convert
from converter.hf import ConvertError

LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture
def f16(smol_f16):
    return smol_f16


def test_f16_tokenizes_like_transformers(hf_model, f16):
    # The logits verdict on this file is checked through the CLI (test_verdicts.py).
    tok = verify.tokenizer_parity(hf_model, f16)
    assert tok["ok"], tok["mismatches"][:2]


def test_metadata_template_and_special_tokens(hf_model, f16):
    from models.gguf_check import check_gguf

    meta = check_gguf(f16).metadata
    template = (hf_model / "chat_template.jinja").read_text()
    assert meta["tokenizer.chat_template"] == template
    assert meta["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["crofter.source.hf_dir"] == str(hf_model.resolve())
    assert oct(f16.stat().st_mode & 0o777) == "0o644"


def test_converted_model_chats_with_its_template_and_stops(f16):
    """Portable checks: the reply equals raw llama-cpp-python's on the same file, and a reply
    forced by a grammar ends at the template's end-of-turn token, not at max_tokens."""
    import llama_cpp
    from llama_cpp import LlamaGrammar

    from app.engine import Engine, LoadOptions, Sampling
    from converter.convert import native_stderr_quiet
    from models.registry import ModelEntry
    from tests.anchors import raw_greedy

    eng = Engine.load(ModelEntry("smol-f16", str(f16), "gguf", "converted"), LoadOptions(n_ctx=1024, seed=1))
    with native_stderr_quiet():
        raw = llama_cpp.Llama(str(f16), n_ctx=1024, verbose=False, seed=1)
    try:
        assert eng.template.warning is None  # the GGUF's own template, not the ChatML fallback
        tokens = eng.tokenize_chat([{"role": "user", "content": "What is the capital of France?"}])
        s = Sampling(temperature=0.0, max_tokens=32, repeat_penalty=1.1)
        reply = eng.complete(tokens, s)
        assert reply.text and reply.text == raw_greedy(raw, tokens, s.max_tokens)
        forced = eng.complete(tokens, Sampling(temperature=0.0, max_tokens=16,
                                               grammar=LlamaGrammar.from_string('root ::= "Paris."', verbose=False)))
        assert forced.text == "Paris." and forced.finish_reason == "stop"  # stopped at <|im_end|>
    finally:
        raw.close()
        eng.close()


def test_q4_k_m_loads_answers_and_reports(hf_model, f16, tmp_path):
    from app.engine import Engine, LoadOptions, Sampling
    from app.session import ChatSession
    from app.turn import finish
    from converter.quantize import quantize
    from models.registry import ModelEntry

    q = quantize(f16, tmp_path / "smol-Q4_K_M.gguf", "Q4_K_M")
    assert q.size_bytes < f16.stat().st_size * 0.5
    eng = Engine.load(ModelEntry("q", str(q.path), "gguf", "converted"), LoadOptions(n_ctx=1024, seed=1))
    try:
        s = ChatSession(eng, Sampling(temperature=0.0, max_tokens=32, repeat_penalty=1.1))
        assert finish(s.send("What is the capital of France?")).answer.strip()
    finally:
        eng.close()
    r = verify.quant_report(f16, q.path, (LICENSES / "GPL-3").read_text(), n_ctx=256, max_tokens=1024)
    assert r["ppl_base"] > 1 and r["ppl_quant"] > 1 and r["mean_kld"] > 0
    assert 0.5 < r["same_top_token"] < 1.0
    with pytest.raises(ConvertError, match="already quantized"):
        quantize(q.path, tmp_path / "again.gguf", "Q4_K_M")


def test_imatrix_covers_every_linear_layer(hf_model, f16, tmp_path):
    from converter.imatrix import compute_imatrix
    from converter.quantize import quantize

    im = compute_imatrix(hf_model, LICENSES / "Apache-2.0", max_tokens=1024)
    cfg = json.loads((hf_model / "config.json").read_text())
    assert len(im) == 7 * cfg["num_hidden_layers"] + 1  # q k v o gate up down per block, and output
    assert im["blk.0.attn_q.weight"].shape == (cfg["hidden_size"],)
    assert im["blk.0.ffn_down.weight"].shape == (cfg["intermediate_size"],)
    assert all((v >= 0).all() and v.max() > 0 for v in im.values())
    q = quantize(f16, tmp_path / "cal.gguf", "Q4_K_M", imatrix=im)
    assert q.imatrix_tensors == len(im)


def test_kill_9_mid_convert_leaves_no_final_file(hf_model, tmp_path):
    out = tmp_path / "killed.gguf"
    cmd = [sys.executable, "-m", "app.cli", "convert", str(hf_model), "--out", str(out), "--outtype", "f32",
           "--no-verify", "--no-register"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    partial = []
    # Kill once the temp file holds some tensor data (the header alone is a few MB).
    while proc.poll() is None and time.monotonic() < deadline:
        partial = [p for p in tmp_path.glob(".killed.gguf.*.partial") if p.stat().st_size > 50_000_000]
        if partial:
            break
        time.sleep(0.02)
    assert partial, "the convert finished or never started writing: " + (proc.stderr.read().decode() if proc.poll() is not None else "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # The next run sweeps the dead process's temp file and completes.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists() and not list(tmp_path.glob(".killed.gguf.*.partial"))


def test_refusals(hf_model, tmp_path):
    def clone(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(hf_model, d, ignore=shutil.ignore_patterns("*.safetensors"))
        os.symlink(hf_model / "model.safetensors", d / "model.safetensors")
        return d

    neox = clone("neox")
    cfg = json.loads((neox / "config.json").read_text())
    (neox / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ConvertError, match="GPTNeoXForCausalLM.*not supported"):
        convert(neox, tmp_path / "x.gguf")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_model / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ConvertError, match="pickled weights"):
        convert(pickled, tmp_path / "x.gguf")

    spm = clone("spm")
    tj = json.loads((spm / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConvertError, match="SentencePiece-style"):
        convert(spm, tmp_path / "x.gguf")

    broken = clone("broken")
    (broken / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "thirty"}))
    with pytest.raises(ConvertError, match="num_hidden_layers"):
        convert(broken, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


def test_large_tensors_written_in_row_blocks_give_the_same_file(hf_model, tmp_path, monkeypatch):
    """A tensor over tensor_write.BLOCK_BYTES is read and encoded in row blocks (bounded memory);
    the bytes written are those of the whole-tensor path, for F16 and Q8_0 alike."""
    from converter import tensor_write
    from converter.convert import convert

    from .conftest import tiny_llama

    src = tiny_llama(hf_model, tmp_path / "tiny")
    for outtype in ("f16", "q8_0"):
        whole = convert(src, tmp_path / f"whole-{outtype}.gguf", outtype).path.read_bytes()
        monkeypatch.setattr(tensor_write, "BLOCK_BYTES", 4096)  # every 2-D tensor over 4 KiB goes in blocks
        blocks = convert(src, tmp_path / f"blocks-{outtype}.gguf", outtype).path.read_bytes()
        monkeypatch.undo()
        assert blocks == whole

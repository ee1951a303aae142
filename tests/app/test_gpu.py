"""GPU offload: automatic on a CUDA build of llama.cpp, CPU otherwise."""
from __future__ import annotations

import llama_cpp
import pytest

from app.engine import Engine, LoadOptions, Sampling, auto_gpu_layers
from models.registry import ModelEntry

OFFLOAD = llama_cpp.llama_supports_gpu_offload()


def test_auto_choice_follows_the_build():
    assert auto_gpu_layers(-1) == (-1 if OFFLOAD else 0)
    assert auto_gpu_layers(0) == 0
    assert auto_gpu_layers(7) == 7


def test_cpu_build_loads_on_cpu(engine):
    if OFFLOAD:
        pytest.skip("this llama.cpp build can offload")
    assert engine.gpu_layers == 0


@pytest.mark.gpu
@pytest.mark.skipif(not OFFLOAD, reason="llama.cpp was built without GPU offload (no CUDA here)")
def test_all_layers_on_gpu_answer_like_cpu(bundled_path):
    entry = ModelEntry("s", str(bundled_path), "gguf")
    gpu = Engine.load(entry, LoadOptions(n_ctx=1024, gpu_layers=-1))
    cpu = Engine.load(entry, LoadOptions(n_ctx=1024, gpu_layers=0))
    try:
        assert gpu.gpu_layers == -1
        prompt = gpu.tokenize_chat([{"role": "user", "content": "What is the capital of France?"}])
        s = Sampling(temperature=0.0, max_tokens=24)
        on_gpu = gpu.complete(prompt, s)
        assert "Paris" in on_gpu.text
        assert on_gpu.decode_tokens_per_s > 0
        # Kernels differ, so compare loosely: the answer, not every token.
        assert "Paris" in cpu.complete(prompt, s).text
    finally:
        gpu.close()
        cpu.close()

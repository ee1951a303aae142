"""The embedder run by OpenVINO: the same ONNX export as the onnx backend, compiled for this CPU.

OpenVINO reads the float32 ONNX file that rag/onnx_embed.py exports (and caches) and compiles it
for the CPU in bf16 where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), float32
elsewhere. Unlike torch's bf16 path, its CPU plugin fuses attention too, so the whole encoder,
not just its linear layers, runs at bf16 speed: on a 2-core AVX512-BF16 EPYC it encodes 2.4x as
many chunks a second as float32 torch (torch-bf16: 1.65x), with vectors equal to cosine 0.9999.

Only the runtime is used. The package's model converter (``openvino.tools.ovc``, behind
``openvino.convert_model``) reports usage over the network as soon as it is imported, and
``import openvino`` imports it unless it cannot; `import_runtime` makes sure it cannot, so that
crofter makes no network calls at run time.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from .onnx_embed import OnnxEncoder, export

# Kernels the CPU plugin keeps, one set per input shape it has run. Its default (5,000) let an
# encoder fed 1,200 batch shapes grow by 1.5 GB (about 1.3 MB a shape); 64 holds it to +240 MB
# over 1,000 shapes, at the same chunks/s, and one query's encode at 2.7 ms (0 entries: 5.5 ms).
RUNTIME_CACHE = 64
# Batches of at most 16: the same chunks/s as 32 (103-104 against 104-107 on 960 chunks) with
# half the activations held (peak RSS 1,009 MB against 1,171 MB once a batch of 256-token texts ran).
MAX_BATCH = 16


def import_runtime():
    """`openvino` without its converter. The package imports ``openvino.tools.ovc`` inside a
    ``try/except ImportError``, and that module sends a usage event on import (to Google Analytics,
    unless the user has opted out by hand); a None in sys.modules makes its import fail, so the
    runtime loads alone. Where openvino is already loaded (by something other than crofter), it is
    returned as it is."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino.tools.ovc", None)
    import openvino

    return openvino


def precision() -> str:
    """"bf16" where the CPU has native bf16 (rag/embed.py `native_bf16`), else "f32". OpenVINO
    would pick the same by itself; it is named here so that the choice is crofter's, the same test
    that "auto" makes for torch-bf16."""
    from .embed import native_bf16

    return "bf16" if native_bf16() else "f32"


def compile_for_cpu(ov, onnx_file: Path):
    """An ONNX file compiled for this CPU at `precision()`, keeping at most RUNTIME_CACHE shapes'
    kernels. LATENCY: one stream using every core for each batch (two streams of one core each,
    with batches in flight on both, gave no more chunks/s on 2 cores)."""
    core = ov.Core()
    return core.compile_model(core.read_model(str(onnx_file)), "CPU",
                              {"INFERENCE_PRECISION_HINT": precision(), "PERFORMANCE_HINT": "LATENCY",
                               "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE})


class OpenVinoEncoder(OnnxEncoder):
    """`OnnxEncoder`'s tokenizing, batching and pooling, with OpenVINO running each batch."""

    def __init__(self, st_model, folder: Path, cache: Path | None = None):
        self._lock = threading.Lock()
        super().__init__(st_model, folder, "openvino", cache)

    def runtime(self):
        return import_runtime()

    def prepare(self, ov, st_model, fp32: Path, path: Path):
        if not fp32.is_file():
            export(st_model, fp32, self.input_names)
        compiled = compile_for_cpu(ov, fp32)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "bf16" or "f32"
        self._request = compiled.create_infer_request()
        return compiled

    def encode(self, texts: list[str], batch_size: int):
        # One encode at a time (serve may embed for two clients at once): the infer request is
        # reused between batches (it keeps its buffers) and is not thread-safe, nor is the fast
        # tokenizer; each batch already uses every core.
        with self._lock:
            return super().encode(texts, min(batch_size, MAX_BATCH))

    def run(self, feed: dict):
        return self._request.infer(feed)[0]  # a copy: the request's own output is reused

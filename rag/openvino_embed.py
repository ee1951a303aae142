"""The embedder run by OpenVINO: the same ONNX export as the onnx backend, compiled for this CPU.

OpenVINO reads the float32 ONNX file that rag/onnx_embed.py exports (and caches) and compiles it
for the CPU in bf16 where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), float32
elsewhere. Unlike torch's bf16 path, its CPU plugin fuses attention too, so the whole encoder,
not just its linear layers, runs at bf16 speed: on a 2-core AVX512-BF16 EPYC it encodes 2.4x as
many chunks a second as float32 torch (torch-bf16: 1.65x), with vectors equal to cosine 0.9999.

Only the runtime is used (``Core.read_model`` on the ONNX file). OpenVINO's model converter
(``openvino.convert_model``) is never called: it reports usage over the network unless the user
has opted out, and crofter makes no network calls at run time.
"""
from __future__ import annotations

import threading
from pathlib import Path

from .onnx_embed import OnnxEncoder, _export

# Kernels the CPU plugin keeps, one set per input shape it has run. Its default (5,000) let an
# encoder fed 1,200 batch shapes grow by 1.5 GB (about 1.3 MB a shape); 64 holds it to +240 MB
# over 1,000 shapes, at the same chunks/s, and one query's encode at 2.7 ms (0 entries: 5.5 ms).
RUNTIME_CACHE = 64
# Batches of at most 16: the same chunks/s as 32 (103-104 against 104-107 on 960 chunks) with
# half the activations held (peak RSS 1,009 MB against 1,171 MB once a batch of 256-token texts ran).
MAX_BATCH = 16


def precision() -> str:
    """"bf16" where the CPU has native bf16 (rag/embed.py `native_bf16`), else "f32". OpenVINO
    would pick the same by itself; it is named here so that the choice is crofter's, the same test
    that "auto" makes for torch-bf16."""
    from .embed import native_bf16

    return "bf16" if native_bf16() else "f32"


class OpenVinoEncoder(OnnxEncoder):
    """`OnnxEncoder`'s tokenizing, batching and pooling, with OpenVINO running each batch."""

    def __init__(self, st_model, folder: Path, cache: Path | None = None):
        self._lock = threading.Lock()
        super().__init__(st_model, folder, "openvino", cache)

    def _prepare(self, st_model, fp32: Path, path: Path):
        if not fp32.is_file():
            _export(st_model, fp32, self.input_names)
        import openvino as ov

        core = ov.Core()
        # LATENCY: one stream using every core for each batch (two streams of one core each, with
        # batches in flight on both, gave no more chunks/s on 2 cores).
        compiled = core.compile_model(core.read_model(str(fp32)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": precision(), "PERFORMANCE_HINT": "LATENCY",
                                       "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE})
        missing = set(self.input_names) - {name for port in compiled.inputs for name in port.get_names()}
        if missing:
            raise RuntimeError(f"the exported model lacks the inputs {', '.join(sorted(missing))}")
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "bf16" or "f32"
        self._request = compiled.create_infer_request()
        return compiled

    def encode(self, texts: list[str], batch_size: int):
        return super().encode(texts, min(batch_size, MAX_BATCH))

    def _run(self, feed: dict):
        # One request, reused: it keeps its buffers between batches. Not thread-safe, so a lock
        # (serve may embed for two clients at once); `infer` copies the output out of the request.
        with self._lock:
            return self._request.infer(feed)[0]

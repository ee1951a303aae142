"""What runs the embedding model (#17 item 4): torch float32 (the reference), torch-bf16,
OpenVINO (auto's choice on a CPU), and ONNX Runtime in float32 and int8. Each must give unit
float32 vectors that agree with float32 torch; "auto" must pick by what the machine has."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..app.test_cli import crofter
from .conftest import LICENSES

ROOT = Path(__file__).resolve().parents[2]

TEXTS = ["The licensee may distribute copies of the program.", "How tides follow the moon", "",
         "word " * 300, "Patent grants and their termination."]


def test_onnx_backends_agree_with_torch_and_cache_their_export(tmp_path, embedder):
    from rag.embed import EmbedError, Embedder

    ref = embedder.encode(TEXTS)
    cache = tmp_path / "onnx"
    fp32 = Embedder(device="cpu", backend="onnx", cache=cache)
    v = fp32.encode(TEXTS)
    assert v.shape == ref.shape and v.dtype == np.float32
    assert np.min(np.sum(v * ref, axis=1)) > 0.9999
    int8 = Embedder(device="cpu", backend="onnx-int8", cache=cache)
    c = np.sum(int8.encode(TEXTS) * ref, axis=1)
    assert c.min() > 0.95 and c.mean() > 0.97, c
    assert int8.encode([]).shape == (0, ref.shape[1])
    (folder,) = cache.iterdir()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["model-int8.onnx", "model.onnx"], files  # no temp file left behind
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    Embedder(device="cpu", backend="onnx", cache=cache)
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp, "the export is made once"
    # A damaged cached model is made again rather than failing every later run.
    (folder / "model-int8.onnx").write_bytes(b"not onnx")
    again = Embedder(device="cpu", backend="onnx-int8", cache=cache)
    assert np.sum(again.encode(TEXTS[:1]) * ref[:1]) > 0.95
    with pytest.raises(EmbedError, match="embedding backend 'tensorrt': expected one of auto, torch, torch-bf16, "
                                         "openvino, onnx, onnx-int8"):
        Embedder(device="cpu", backend="tensorrt")


def test_the_bf16_backend_gives_float32_unit_vectors_that_agree_with_float32(embedder):
    import torch

    from rag.embed import Embedder

    ref = embedder.encode(TEXTS)
    bf16 = Embedder(device="cpu", backend="torch-bf16")
    assert bf16.backend == "torch-bf16"
    linear = [m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(p.dtype == torch.float32 for p in embedder.model.parameters()), "the float32 model is its own"
    v = bf16.encode(TEXTS)
    assert v.shape == ref.shape and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    cos = np.sum(v * ref, axis=1)
    assert cos.min() > 0.999, cos
    # The same batch gives the same numbers (a different batch moves them by ~1e-3: padding).
    assert np.array_equal(bf16.encode(TEXTS), v)
    assert bf16.encode([]).shape == (0, ref.shape[1])


def test_openvino_compiles_the_onnx_export_and_agrees_with_torch(tmp_path, embedder, monkeypatch):
    from rag.embed import Embedder
    from rag.openvino_embed import RUNTIME_CACHE, import_runtime, precision

    openvino = import_runtime()
    configs, compile_model = [], openvino.Core.compile_model
    monkeypatch.setattr(openvino.Core, "compile_model",
                        lambda core, model, device, config: configs.append(config) or compile_model(core, model, device, config))
    ref = embedder.encode(TEXTS)
    cache = tmp_path / "onnx"
    ov = Embedder(device="cpu", backend="openvino", cache=cache)
    assert ov.backend == "openvino" and ov.exported.precision == precision() in ("bf16", "f32")
    # A bounded kernel cache (the plugin's default grows by about 1.3 MB for every batch shape;
    # a compiled model does not report the setting back, so its compile call is watched).
    assert [c.get("CPU_RUNTIME_CACHE_CAPACITY") for c in configs] == [RUNTIME_CACHE]
    v = ov.encode(TEXTS)
    assert v.shape == ref.shape and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cos = np.sum(v * ref, axis=1)
    assert cos.min() > 0.999, cos
    assert np.array_equal(ov.encode(TEXTS), v), "the same batch gives the same numbers"
    # Sorted into batches by length, each text's vector is its own: order in, order out.
    other = ov.encode(TEXTS[::-1], batch_size=2)[::-1]
    assert np.sum(other * v, axis=1).min() > 0.999
    assert (np.argmax(other @ v.T, axis=1) == np.arange(len(TEXTS))).all()
    assert ov.encode([]).shape == (0, ref.shape[1])
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"], "the onnx backend's export, nothing else"
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    Embedder(device="cpu", backend="openvino", cache=cache)
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp, "the export is made once"
    (folder / "model.onnx").write_bytes(b"\0" * 4096)  # damaged by hand: made again, once
    again = Embedder(device="cpu", backend="openvino", cache=cache)
    assert np.sum(again.encode(TEXTS[:1]) * ref[:1]) > 0.999


def test_openvino_loads_without_its_converter_which_reports_usage_online(tmp_path):
    """`import openvino` alone loads its model converter, which writes ~/intel/openvino_ga_cid and
    sends a usage event to Google Analytics. crofter's backend must load the runtime only: run in a
    fresh interpreter (openvino not yet imported) with a home of its own to look at afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from rag.embed import Embedder\n"
        f"e = Embedder(device='cpu', backend='openvino', cache=Path({str(tmp_path / 'onnx')!r}))\n"
        "v = e.encode(['tides follow the moon'])\n"
        "import openvino\n"
        "print(json.dumps({'backend': e.backend, 'shape': list(v.shape), 'converter': hasattr(openvino, 'convert_model'),"
        " 'loaded': sorted(m for m in sys.modules if 'telemetry' in m or (m.startswith('openvino.tools') and sys.modules[m]))}))\n")
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen == {"backend": "openvino", "shape": [1, 384], "converter": False, "loaded": []}
    assert list(home.iterdir()) == [], "nothing written into the home folder (no ~/intel)"


def test_auto_picks_openvino_then_bf16_torch_by_what_the_machine_has(tmp_path, monkeypatch):
    import rag.embed as embed
    from rag.ingest import Ingestor
    from rag.store import Store
    from rag.openvino_embed import OpenVinoEncoder

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not embed.native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert embed.native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu amx_tile amx_bf16\n")
    assert embed.native_bf16(str(info))
    assert not embed.native_bf16(str(tmp_path / "missing"))
    assert embed.resolve_backend("auto", "cpu") == "openvino", "installed with crofter"
    assert embed.resolve_backend("auto", "cuda") == "torch"
    assert embed.resolve_backend("torch", "cpu") == "torch"
    assert embed.resolve_backend("onnx-int8", "cpu") == "onnx-int8"
    monkeypatch.setattr(embed, "native_bf16", lambda: True)
    assert embed.torch_backend("cpu") == "torch-bf16" and embed.torch_backend("cuda") == "torch"
    monkeypatch.setattr(embed, "native_bf16", lambda: False)
    assert embed.torch_backend("cpu") == "torch"
    # Where OpenVINO will not compile the model, auto runs torch and says so; asked for by
    # name, the failure is an error naming the backend.
    def fail(self, ov, st_model, fp32, path):
        raise RuntimeError("no CPU plugin")

    monkeypatch.setattr(OpenVinoEncoder, "prepare", fail)
    fallback = embed.Embedder(device="cpu", backend="auto", cache=tmp_path / "onnx")
    assert fallback.backend == "torch" and fallback.exported is None
    assert "cannot prepare the openvino backend" in fallback.fallback and "no CPU plugin" in fallback.fallback
    assert fallback.encode(["tides"]).shape == (1, 384)
    doc = tmp_path / "tides.md"
    doc.write_text("# Tides\n\nThey follow the moon.\n")
    with Store(tmp_path / "rag") as store:
        summary = Ingestor(store, lambda: fallback, embedder_name="all-MiniLM-L6-v2").run([doc], "t")
    assert summary.chunks == 1 and summary.backend == "torch" and "no CPU plugin" in summary.as_dict()["fallback"]
    with pytest.raises(embed.EmbedError, match="cannot prepare the openvino backend .*no CPU plugin"):
        embed.Embedder(device="cpu", backend="openvino", cache=tmp_path / "onnx")

    def missing(self):
        raise ImportError("No module named 'openvino'", name="openvino")

    monkeypatch.setattr(OpenVinoEncoder, "runtime", missing)
    with pytest.raises(embed.EmbedError, match=r"the openvino backend needs openvino, which is not installed "
                                               r"\(pip install openvino\)"):
        embed.Embedder(device="cpu", backend="openvino", cache=tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists(), "nothing exported for a runtime that is missing"
    assert embed.Embedder(device="cpu", backend="auto", cache=tmp_path / "onnx").backend == "torch"


@pytest.mark.parametrize("backend", ["onnx-int8", "torch-bf16", "auto"])
def test_ingest_and_search_with_a_faster_backend_from_the_config(tmp_path, crofter_home, backend):
    from rag.embed import pick_device, resolve_backend

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(LICENSES / name, docs / name)
    crofter_home.mkdir(parents=True, exist_ok=True)
    (crofter_home / "config.toml").write_text(f'embed_backend = "{backend}"\n')
    r = crofter("ingest", str(docs), "-c", "lic", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    ran = resolve_backend(backend, pick_device())  # auto: openvino on a CPU, torch where CUDA is
    assert summary["chunks"] > 0 and summary["backend"] == ran and summary["fallback"] == ""
    r = crofter("search", "Mozilla Public License", "-c", "lic", "-k", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["source"].endswith("MPL-2.0")
    exported = {p.name for p in (crofter_home / "cache" / "onnx").glob("*/*.onnx")}
    assert exported == {"onnx-int8": {"model.onnx", "model-int8.onnx"}, "openvino": {"model.onnx"}}.get(ran, set())
    (crofter_home / "config.toml").write_text('embed_backend = "gpu-magic"\n')
    r = crofter("search", "x", "-c", "lic")
    assert r.returncode != 0 and "embed_backend" in r.stderr and "Traceback" not in r.stderr


def test_openvino_encodes_for_several_threads_at_once(tmp_path):
    """serve's /v1/embeddings and grounded chats may embed from two threads at once; each caller
    gets its own texts' vectors, the same as when it runs alone."""
    from concurrent.futures import ThreadPoolExecutor

    from rag.embed import Embedder

    ov = Embedder(device="cpu", backend="openvino", cache=tmp_path / "onnx")
    sets = [[f"{word} number {i}: " + "tides follow the moon " * (i % 7 + 1) for i in range(n)]
            for n, word in ((3, "harbour"), (17, "licence"), (5, "patent"), (9, "river"))]
    alone = [ov.encode(texts) for texts in sets]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda k: ov.encode(sets[k % 4]), range(24)))
    for k, got in enumerate(together):
        assert np.array_equal(got, alone[k % 4]), k

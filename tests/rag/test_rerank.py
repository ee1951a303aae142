"""The optional cross-encoder (rag/rerank.py): what it accepts, and the same scores on torch and
OpenVINO (rag/openvino_rerank.py). The folder is the bundled MiniLM under a seeded, untrained
one-output head (the `cross_encoder` fixture): real weights of a real cross-encoder's shape."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from .conftest import LICENSES

PASSAGES = [LICENSES.joinpath(n).read_text()[i:i + 700] for n in ("Apache-2.0", "BSD", "MPL-2.0", "GPL-3")
            for i in (0, 3000, 9000)]
QUERY = "May I use the patent grant if I sue a contributor?"


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-cache")


def test_reranker_refuses_what_is_not_a_cross_encoder(tmp_path, cross_encoder):
    """Any BERT folder loads as a CrossEncoder with a new random head; crofter says what it is instead."""
    import json

    from rag.embed import EmbedError, default_model_dir
    from rag.rerank import Reranker, check_folder

    with pytest.raises(EmbedError, match="not a folder"):
        Reranker("/nonexistent/reranker")
    with pytest.raises(EmbedError, match=r"a BertModel model, not a cross-encoder"):
        Reranker(default_model_dir())  # the embedder
    three = tmp_path / "nli"
    shutil.copytree(cross_encoder, three)
    cfg = json.loads((three / "config.json").read_text())
    cfg["id2label"] = {"0": "contradiction", "1": "entailment", "2": "neutral"}
    (three / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmbedError, match="3 outputs"):
        check_folder(three)
    (three / "config.json").write_text("{not json")
    with pytest.raises(EmbedError, match=r"config.json: unreadable"):
        check_folder(three)
    (three / "config.json").unlink()
    with pytest.raises(EmbedError, match="no config.json"):
        check_folder(three)
    assert check_folder(cross_encoder) == cross_encoder

    # No id2label: transformers reads two labels, and so does the check.
    two = tmp_path / "two"
    shutil.copytree(cross_encoder, two)
    cfg = json.loads((two / "config.json").read_text())
    del cfg["id2label"], cfg["label2id"]
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmbedError, match="2 outputs"):
        check_folder(two)
    # Only pickled weights: never loaded.
    for w in two.glob("*.safetensors"):
        w.unlink()
    (two / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled")
    with pytest.raises(EmbedError, match="no .safetensors"):
        check_folder(two)


def test_a_saved_cross_encoder_is_judged_by_its_outputs(tmp_path, cross_encoder):
    """A folder sentence-transformers saved as a CrossEncoder passes on its modules.json and is then
    held to one output once loaded; an embedder's modules.json does not make it a cross-encoder."""
    import json

    from sentence_transformers import CrossEncoder

    from rag.embed import EmbedError, default_model_dir
    from rag.rerank import Reranker, check_folder

    saved = tmp_path / "saved"
    CrossEncoder(str(cross_encoder), device="cpu", local_files_only=True).save_pretrained(str(saved))
    assert (saved / "modules.json").is_file()
    assert Reranker(saved, device="cpu").scores("q", ["a", "b"]) == pytest.approx(
        Reranker(cross_encoder, device="cpu").scores("q", ["a", "b"]), abs=1e-5)
    three = tmp_path / "three"
    CrossEncoder(str(default_model_dir()), device="cpu", local_files_only=True, num_labels=3).save_pretrained(str(three))
    check_folder(three)  # passes on the saved type ...
    with pytest.raises(EmbedError, match="scores with 3 outputs"):
        Reranker(three, device="cpu")  # ... and is refused by what it loads as
    st = json.loads((saved / "config_sentence_transformers.json").read_text())
    st["model_type"] = "SentenceTransformer"
    (saved / "config_sentence_transformers.json").write_text(json.dumps(st))
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmbedError, match="a BertModel model, not a cross-encoder"):
        check_folder(saved)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_one_reranker_serves_several_threads(cross_encoder, ov_cache, backend):
    """serve shares one loaded reranker between request threads: each gets the scores it would alone."""
    from concurrent.futures import ThreadPoolExecutor

    from rag.rerank import Reranker

    rer = Reranker(cross_encoder, device="cpu", backend=backend, cache=ov_cache)
    jobs = [(f"question {i}", [f"passage {i} {j} " * (1 + (i + j) % 7) for j in range(6)]) for i in range(12)]
    alone = [rer.scores(q, ps) for q, ps in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: rer.scores(*job), jobs))
    assert len(together) == len(alone)
    for got, want in zip(together, alone):
        assert got == pytest.approx(want, abs=1e-5)


def test_openvino_in_float32_scores_as_torch_does(cross_encoder, ov_cache, monkeypatch):
    import rag.openvino_embed
    import rag.openvino_rerank as ovr
    from rag.rerank import Reranker

    monkeypatch.setattr(rag.openvino_embed, "precision", lambda: "f32")
    ov = Reranker(cross_encoder, backend="openvino", cache=ov_cache)
    assert ov.backend == "openvino" and ov.scorer.precision == "f32" and not ov.fallback
    assert ov.scorer.path.is_file() and ov.scorer.path.parent.parent == ov_cache
    torch_ = Reranker(cross_encoder, backend="torch", device="cpu")
    want = torch_.scores(QUERY, PASSAGES)
    assert ov.scores(QUERY, PASSAGES) == pytest.approx(want, abs=1e-4)
    assert ov.scores(QUERY, PASSAGES[:1]) == pytest.approx(want[:1], abs=1e-4)  # a batch of one, and order kept
    assert ov.scores(QUERY, []) == []

    # The export is made once: a second reranker compiles the cached file.
    monkeypatch.setattr(ovr, "export", lambda *a: pytest.fail("exported again"))
    assert Reranker(cross_encoder, backend="openvino", cache=ov_cache).scores(QUERY, PASSAGES) == pytest.approx(
        want, abs=1e-4)


def test_openvino_at_the_cpus_own_precision_moves_the_scores_little(cross_encoder, ov_cache):
    """bf16 where the CPU has it (float32 elsewhere): the scores move by little against their spread.
    (Not the exact order: this untrained head's top two lie 2e-3 apart, close enough for another
    CPU's bf16 kernels to swap them.)"""
    from rag.rerank import Reranker

    ov = Reranker(cross_encoder, backend="auto", cache=ov_cache)
    assert ov.backend == "openvino", ov.fallback
    want = np.array(Reranker(cross_encoder, backend="torch", device="cpu").scores(QUERY, PASSAGES))
    got = np.array(ov.scores(QUERY, PASSAGES))
    assert np.abs(got - want).max() < 0.1 * want.std()


def test_a_damaged_export_is_made_again(cross_encoder, tmp_path):
    from rag.rerank import Reranker

    first = Reranker(cross_encoder, backend="openvino", cache=tmp_path)
    first.scorer.path.write_bytes(b"not onnx")
    again = Reranker(cross_encoder, backend="openvino", cache=tmp_path)
    assert again.backend == "openvino" and again.scorer.path.stat().st_size > 1_000_000


def test_without_openvino_auto_runs_torch_and_says_why(cross_encoder, tmp_path, monkeypatch):
    import rag.openvino_rerank as ovr
    from rag.embed import EmbedError
    from rag.rerank import Reranker

    def missing():
        raise ImportError("No module named 'openvino'", name="openvino")

    monkeypatch.setattr(ovr, "import_runtime", missing)
    rer = Reranker(cross_encoder, backend="auto", cache=tmp_path)
    assert rer.backend == "torch" and rer.fallback == "openvino: openvino is not installed"
    assert rer.scores(QUERY, PASSAGES[:2]) == pytest.approx(
        Reranker(cross_encoder, backend="torch", device="cpu").scores(QUERY, PASSAGES[:2]), abs=1e-5)
    with pytest.raises(EmbedError, match="cannot run on openvino: openvino is not installed"):
        Reranker(cross_encoder, backend="openvino", cache=tmp_path)
    with pytest.raises(EmbedError, match="backend must be one of"):
        Reranker(cross_encoder, backend="onnx")
    assert not list(tmp_path.iterdir()), "nothing exported"


def test_a_failure_while_scoring_falls_back_to_torch(cross_encoder, ov_cache, monkeypatch):
    from rag.rerank import Reranker

    rer = Reranker(cross_encoder, backend="auto", cache=ov_cache)
    assert rer.backend == "openvino", rer.fallback

    def broken(query, passages):
        raise RuntimeError("Infer Request is busy")

    monkeypatch.setattr(rer.scorer, "scores", broken)
    want = Reranker(cross_encoder, backend="torch", device="cpu").scores(QUERY, PASSAGES)
    assert rer.scores(QUERY, PASSAGES) == pytest.approx(want, abs=1e-5)
    assert (rer.backend, rer.scorer) == ("torch", None)
    assert rer.fallback == "openvino failed while scoring: Infer Request is busy"

"""BI5: pickles, remote-code-only checkpoints and non-finite weights are refused with the reason,
and nothing is left at the final path. (Overlapping safetensors offsets are tested with the
safetensors header reader.)"""
from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest

from converter.convert import convert
from converter.hf import ConvertError

from .conftest import crofter, error_lines, tiny_llama


class _Canary:
    """A pickle that creates `path` when it is loaded: what a malicious checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _bomb(canary: Path) -> bytes:
    return pickle.dumps(_Canary(canary))


def _nothing_written(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(folder.glob(f".{out.name}.*.partial"))


def test_the_canary_pickle_fires_when_loaded(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(_bomb(probe))  # the check below would prove nothing if loading did not run code
    assert probe.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_pickle_only_checkpoint_is_refused(hf_model, tmp_path, name):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(hf_model / "config.json", folder)
    canary = tmp_path / "canary"
    (folder / name).write_bytes(_bomb(canary))
    with pytest.raises(ConvertError, match=rf"only pickled weights \({name}\).*refuses them because loading a pickle"):
        convert(folder, tmp_path / "x.gguf")
    assert not canary.exists()
    _nothing_written(tmp_path, tmp_path / "x.gguf")


def test_pickles_beside_safetensors_are_never_opened(hf_model, tmp_path):
    folder = tiny_llama(hf_model, tmp_path / "mixed")
    canary = tmp_path / "canary"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "last.ckpt"):
        (folder / name).write_bytes(_bomb(canary))
    out = convert(folder, tmp_path / "mixed.gguf", "f16").path
    assert out.exists() and not canary.exists()


def test_remote_code_only_checkpoint_is_refused(hf_model, tmp_path):
    folder = tiny_llama(hf_model, tmp_path / "remote")
    canary = tmp_path / "canary"
    (folder / "modeling_crow.py").write_text(f"open({str(canary)!r}, 'w')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["CrowForCausalLM"], model_type="crow",
               auto_map={"AutoConfig": "configuration_crow.CrowConfig",
                         "AutoModelForCausalLM": "modeling_crow.CrowForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"CrowForCausalLM.*own Python code \(auto_map: configuration_crow.py, "
                                           r"modeling_crow.py\); crofter never runs a checkpoint's code"):
        convert(folder, tmp_path / "x.gguf")
    assert not canary.exists()
    _nothing_written(tmp_path, tmp_path / "x.gguf")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_aborts_naming_the_tensor(hf_model, tmp_path, bad):
    def poison(sd):
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = bad  # late in the file: the writer is mid-way

    folder = tiny_llama(hf_model, tmp_path / "poisoned", edit=poison)
    out = tmp_path / "poisoned.gguf"
    with pytest.raises(ConvertError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' has 1 NaN/Inf values "
                                           r"\(first at \(3, 5\)\); refusing"):
        convert(folder, out, "f32")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("name, at", [("model.embed_tokens.weight", (45, 2)),  # read in row blocks
                                      ("model.layers.0.self_attn.q_proj.weight", (13, 4))])  # rows permuted
def test_the_non_finite_position_is_the_checkpoint_s_own(hf_model, tmp_path, monkeypatch, name, at):
    from converter import tensor_write

    monkeypatch.setattr(tensor_write, "BLOCK_BYTES", 4096)  # a few rows per block

    def poison(sd):
        sd[name][at] = math.nan

    folder = tiny_llama(hf_model, tmp_path / "poisoned", edit=poison)
    with pytest.raises(ConvertError, match=rf"tensor '{name}' has 1 NaN/Inf values \(first at \({at[0]}, {at[1]}\)\)"):
        convert(folder, tmp_path / "p.gguf", "f32")


def test_non_finite_weight_is_one_line_from_the_cli(hf_model, tmp_path, crofter_home):
    def poison(sd):
        sd["model.embed_tokens.weight"][7, 0] = math.nan

    folder = tiny_llama(hf_model, tmp_path / "poisoned", edit=poison)
    out = tmp_path / "p.gguf"
    r = crofter("convert", str(folder), "--out", str(out), "--no-verify", home=crofter_home)
    assert r.returncode == 1
    want = ("crofter: error: model.safetensors: tensor 'model.embed_tokens.weight' has 1 NaN/Inf values (first at "
            f"(7, 0)); refusing to convert non-finite weights; nothing written at {out}")
    assert error_lines(r.stderr) == [want], r.stderr
    _nothing_written(tmp_path, out)
    assert not (crofter_home / "models.json").exists()


def test_weights_beyond_f16_range_are_refused_for_f16_only(hf_model, tmp_path):
    def huge(sd):
        sd["model.layers.0.self_attn.o_proj.weight"][0, 0] = 1e5

    folder = tiny_llama(hf_model, tmp_path / "huge", edit=huge)
    with pytest.raises(ConvertError, match=r"'model.layers.0.self_attn.o_proj.weight' has values up to 1e\+05, "
                                           r"beyond F16's range.*--outtype bf16 or f32"):
        convert(folder, tmp_path / "h.gguf", "f16")
    _nothing_written(tmp_path, tmp_path / "h.gguf")
    assert convert(folder, tmp_path / "h.gguf", "bf16").path.exists()

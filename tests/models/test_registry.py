"""The registry: add, list, remove, defaults, and what it refuses."""
from __future__ import annotations

import json
import shutil

import pytest

from models import paths
from models.gguf_check import GGUFError
from models.registry import ModelError, Registry
from tests import gguf_build as gb


def test_bundled_model_is_always_there(bundled_path):
    entries = Registry().entries()
    assert entries[0].name == "smollm2-135m" and entries[0].file == bundled_path


def test_add_gguf_then_remove_keeps_user_file(tmp_path, bundled_path):
    user_copy = tmp_path / "My-Model.Q4_1.gguf"
    shutil.copyfile(bundled_path, user_copy)
    reg = Registry()
    e = reg.add(user_copy)
    assert e.name == "my-model.q4_1" and e.kind == "gguf"
    assert [x.name for x in Registry().entries()] == ["smollm2-135m", "my-model.q4_1"]
    reg.remove("my-model.q4_1")
    assert user_copy.exists()  # only unregistered: the user's own file stays
    assert [x.name for x in reg.entries()] == ["smollm2-135m"]


def test_add_refuses_corrupt_gguf_and_pickles(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gb.good()[:40])
    with pytest.raises(GGUFError):
        Registry().add(bad)
    pkl = tmp_path / "model.bin"
    pkl.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickled"):
        Registry().add(pkl)
    only_bin = tmp_path / "ckpt"
    only_bin.mkdir()
    (only_bin / "config.json").write_text("{}")
    (only_bin / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelError, match="only pickled weights"):
        Registry().add(only_bin)


def test_add_hf_folder(tmp_path):
    ckpt = tmp_path / "tiny-llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(24))
    e = Registry().add(ckpt, name="tiny")
    assert e.kind == "hf"
    from models.info import describe

    facts = describe(e)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["parameters"] == 6


def test_unknown_name_suggests(tmp_path):
    with pytest.raises(ModelError, match="did you mean 'smollm2-135m'"):
        Registry().get("smollm2-135")


def test_bundled_cannot_be_removed_or_shadowed(bundled_path):
    with pytest.raises(ModelError, match="bundled"):
        Registry().remove("smollm2-135m")
    with pytest.raises(ModelError, match="bundled model's name"):
        Registry().add(bundled_path, name="smollm2-135m")


def test_bad_names_refused(tmp_path, bundled_path):
    with pytest.raises(ModelError, match="invalid model name"):
        Registry().add(bundled_path, name="../escape")


def test_remove_deletes_files_crofter_owns(bundled_path):
    owned = paths.models_dir() / "someone--repo" / "x.gguf"
    owned.parent.mkdir(parents=True)
    shutil.copyfile(bundled_path, owned)
    reg = Registry()
    reg.add(owned, name="x")
    reg.remove("x")
    assert not owned.exists() and not owned.parent.exists()


def test_corrupt_registry_file_is_reported():
    reg = Registry()
    reg.file.write_text("{not json")
    with pytest.raises(ModelError, match="unreadable registry"):
        reg.entries()


def test_fields_of_a_newer_crofter_are_ignored(tmp_path, bundled_path):
    """F8, the registry: models.json written by a newer crofter (extra fields) still reads."""
    import json

    reg = Registry()
    reg.file.parent.mkdir(parents=True, exist_ok=True)
    rec = {"path": str(bundled_path), "kind": "gguf", "source": "local", "added": 1.0, "from_the_future": {"x": 1}}
    reg.file.write_text(json.dumps({"version": 1, "models": {"mine": rec}}))
    entry = reg.get("mine")
    assert entry.path == str(bundled_path) and entry.kind == "gguf" and not hasattr(entry, "from_the_future")


def test_resolve_kind_checks_what_a_command_needs(tmp_path, bundled_path):
    reg = Registry()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert reg.resolve_kind(str(folder), "hf", "x") == folder  # a folder path is taken as is
    assert reg.resolve_kind("smollm2-135m", "gguf", "x") == bundled_path
    with pytest.raises(ModelError, match="a GGUF model; training needs an HF checkpoint"):
        reg.resolve_kind("smollm2-135m", "hf", "training needs an HF checkpoint")
    with pytest.raises(ModelError, match="no model named"):
        reg.resolve_kind("nope", "hf", "x")

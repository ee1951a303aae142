"""`crofter models pull` against a loopback stand-in for the Hugging Face Hub."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.hub import HubError, RemoteFile, parse_spec, select
from tests import gguf_build as gb
from tests.hub_server import FakeHub

REPO = "someone/tiny-GGUF"


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


def pull(hub, *args, home):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "CROFTER_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "app.cli", "models", "pull", *args], capture_output=True, text=True, env=env, timeout=120)


def store_files(home):
    root = home / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_pull_gguf_by_quant(hub, crofter_home):
    data = gb.good()
    hub.add(REPO, "tiny-Q8_0.gguf", gb.build([], [("t", (8,), 0)]))
    hub.add(REPO, "tiny-Q4_K_M.gguf", data)
    hub.add(REPO, "README.md", b"# hi")
    r = pull(hub, f"{REPO}:Q4_K_M", "--json", home=crofter_home)
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert entry["kind"] == "gguf" and entry["source"] == f"hub:{REPO}"
    assert store_files(crofter_home) == ["someone--tiny-gguf/tiny-Q4_K_M.gguf"]
    assert hub.downloads("tiny-Q8_0.gguf") == 0
    from models.registry import Registry

    assert Registry().get(entry["name"]).file.read_bytes() == data


def test_pull_checkpoint_never_fetches_pickles(hub, crofter_home):
    repo = "someone/tiny-llama"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    hub.add(repo, "model.safetensors", len(header).to_bytes(8, "little") + header + bytes(8))
    hub.add(repo, "config.json", json.dumps({"architectures": ["LlamaForCausalLM"]}).encode())
    hub.add(repo, "tokenizer.json", b"{}")
    hub.add(repo, "pytorch_model.bin", b"\x80\x04 pickled")
    hub.add(repo, "training_args.pt", b"\x80\x04 pickled")
    r = pull(hub, repo, home=crofter_home)
    assert r.returncode == 0, r.stderr
    assert store_files(crofter_home) == [
        "someone--tiny-llama/config.json", "someone--tiny-llama/model.safetensors", "someone--tiny-llama/tokenizer.json"]
    assert hub.downloads("pytorch_model.bin") == 0 and hub.downloads("training_args.pt") == 0


def test_pickle_named_explicitly_is_refused(hub, crofter_home):
    hub.add(REPO, "model.bin", b"\x80\x04")
    r = pull(hub, f"{REPO}:model.bin", home=crofter_home)
    assert r.returncode == 1 and "never pickles" in r.stderr
    assert hub.downloads("model.bin") == 0


def test_interrupted_transfer_resumes_and_verifies(hub, crofter_home):
    payload = gb.good() + bytes(64 * 1024)  # large enough to be an LFS file
    data = gb.build([], [("t", (len(payload) // 4,), 0)])
    hub.add(REPO, "m-Q4_K_M.gguf", data, fault="cut_once")
    r = pull(hub, REPO, home=crofter_home)
    assert r.returncode == 0, r.stderr
    assert hub.downloads("m-Q4_K_M.gguf") == 2  # cut, then resumed with Range
    assert (crofter_home / "models/someone--tiny-gguf/m-Q4_K_M.gguf").read_bytes() == data


def test_failed_transfer_leaves_nothing(hub, crofter_home):
    data = gb.build([], [("t", (40_000,), 0)])
    hub.add(REPO, "m-Q4_K_M.gguf", data, fault="cut_always")
    r = pull(hub, REPO, home=crofter_home)
    assert r.returncode == 1 and "nothing was saved" in r.stderr, r.stderr
    assert store_files(crofter_home) == []
    assert not (crofter_home / "models" / ".staging").exists()


def test_checksum_mismatch_leaves_nothing(hub, crofter_home):
    data = gb.build([], [("t", (40_000,), 0)])
    hub.add(REPO, "m-Q4_K_M.gguf", data, fault="corrupt")
    r = pull(hub, REPO, home=crofter_home)
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr, r.stderr
    assert store_files(crofter_home) == []


def test_small_file_checked_by_git_blob_sha(hub, crofter_home):
    repo = "someone/small"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    hub.add(repo, "model.safetensors", len(header).to_bytes(8, "little") + header + bytes(4))
    hub.add(repo, "config.json", b'{"architectures": ["LlamaForCausalLM"]}', fault="corrupt")
    r = pull(hub, repo, home=crofter_home)
    assert r.returncode == 1 and "git blob sha1 mismatch" in r.stderr
    assert store_files(crofter_home) == []


def test_unknown_repo_and_quant(hub, crofter_home):
    hub.add(REPO, "m-Q8_0.gguf", gb.good())
    r = pull(hub, "nobody/nothing", home=crofter_home)
    assert r.returncode == 1 and "no such model repo" in r.stderr
    r = pull(hub, f"{REPO}:Q2_K", home=crofter_home)
    assert r.returncode == 1 and "available: Q8_0" in r.stderr


def files(*names):
    return [RemoteFile(n, 1, "0" * 64, None) for n in names]


def test_selection_rules():
    assert parse_spec("a/b:Q4_K_M") == ("a/b", "Q4_K_M")
    with pytest.raises(HubError):
        parse_spec("../etc/passwd")
    kind, chosen = select(files("x-Q8_0.gguf", "x-Q4_K_M.gguf"), None)
    assert kind == "gguf" and [f.name for f in chosen] == ["x-Q4_K_M.gguf"]
    kind, chosen = select(files("x-Q4_K_M-00002-of-00002.gguf", "x-Q4_K_M-00001-of-00002.gguf", "x-Q8_0.gguf"), "q4_k_m")
    assert [f.name for f in chosen] == ["x-Q4_K_M-00001-of-00002.gguf", "x-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(HubError, match="several GGUF"):
        select(files("x-Q8_0.gguf", "x-F16.gguf"), None)
    with pytest.raises(HubError, match="no GGUF or safetensors"):
        select(files("pytorch_model.bin", "config.json"), None)

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


def _pull_process(hub, home, *args, preexec_fn=None):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "CROFTER_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "models", "pull", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)


def _outside_staging(home):
    return [f for f in store_files(home) if not f.startswith(".staging/")]


@pytest.mark.parametrize("delay", [0.1, 1.5])
def test_kill_9_mid_pull_leaves_nothing_and_the_retry_sweeps(hub, crofter_home, delay):
    """F1: a pull killed mid-transfer registers nothing and leaves no file at the final path;
    the next pull sweeps the killed run's staging folder and passes the checksum."""
    import signal
    import time

    from models.registry import Registry

    data = gb.build([], [("t", (1_000_000,), 0)])  # 4 MB, trickled at ~640 KB/s: ~6 s in transfer
    hub.add(REPO, "m-Q4_K_M.gguf", data, fault="slow")
    proc = _pull_process(hub, crofter_home, REPO)
    staging = crofter_home / "models" / ".staging"
    deadline = time.monotonic() + 120
    # huggingface_hub writes its .incomplete file in large blocks: wait for the transfer to
    # start, then kill it `delay` seconds in.
    while not (staging.exists() and any(p.name.endswith(".incomplete") for p in staging.rglob("*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the pull ended before the transfer began"
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, "the transfer finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert _outside_staging(crofter_home) == []
    assert [e.name for e in Registry().entries() if e.source != "bundled"] == []
    assert staging.exists()  # what the killed run left

    hub.faults.pop((REPO, "m-Q4_K_M.gguf"))
    r = pull(hub, REPO, home=crofter_home)
    assert r.returncode == 0, r.stderr
    assert (crofter_home / "models/someone--tiny-gguf/m-Q4_K_M.gguf").read_bytes() == data
    assert not staging.exists()  # swept, and this run's own staging removed


def test_disk_full_during_pull_is_one_line_and_leaves_nothing(hub, crofter_home):
    """F1: the disk fills during the transfer (a file-size limit in the child): one line, nothing saved."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    from models.registry import Registry

    data = gb.build([], [("t", (300_000,), 0)])
    hub.add(REPO, "m-Q4_K_M.gguf", data)
    proc = _pull_process(hub, crofter_home, REPO, preexec_fn=limit)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crofter: error:") and "Traceback" not in err, err
    assert store_files(crofter_home) == []
    assert [e.name for e in Registry().entries() if e.source != "bundled"] == []
    r = pull(hub, REPO, home=crofter_home)  # with room again, the retry passes the checksum
    assert r.returncode == 0, r.stderr
    assert (crofter_home / "models/someone--tiny-gguf/m-Q4_K_M.gguf").read_bytes() == data

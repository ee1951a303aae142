"""Server mode: the same ingest and search against a real `chroma run` on loopback."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import LICENSES, consistent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path):
    exe = shutil.which("chroma") or os.path.join(os.path.dirname(sys.executable), "chroma")
    assert os.path.exists(exe), "the chromadb package installs the `chroma` command"
    port = _free_port()
    proc = subprocess.Popen([exe, "run", "--path", str(tmp_path / "server-data"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, "chroma run exited"
        assert time.monotonic() < deadline, "chroma run did not come up in 60 s"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_ingest_and_search_through_a_chroma_server(chroma_server, tmp_path, embedder):
    from rag.ingest import Ingestor
    from rag.retrieve import Retriever
    from rag.store import Store

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(LICENSES / name, docs / name)
    with Store(tmp_path / "rag", chroma_url=chroma_server) as store:
        s = Ingestor(store, lambda: embedder, embedder_name="all-MiniLM-L6-v2").run([docs], "srv")
        assert len(s.ingested) == 2
        consistent(store, "srv")
        hits = Retriever(store, embedder).search("srv", "Mozilla Public License", k=3)
        assert hits[0].source == str(docs / "MPL-2.0")
        # The vectors live in the server, not in the local data dir.
        assert not (tmp_path / "rag" / "chroma").exists()
    with urllib.request.urlopen(f"{chroma_server}/api/v2/tenants/default_tenant/databases/default_database/collections") as r:
        names = [c["name"] for c in json.load(r)]
    assert "crofter-srv" in names


def test_unreachable_server_is_one_clear_error(tmp_path):
    from rag.store import RagError, Store

    with Store(tmp_path / "rag", chroma_url=f"http://127.0.0.1:{_free_port()}") as store:
        with pytest.raises(RagError, match="cannot reach the Chroma server"):
            store.chroma

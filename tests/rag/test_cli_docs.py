"""`crofter ingest | search | collections | ask --collection` as a user runs them."""
from __future__ import annotations

import json
import shutil

from rag.loaders import extract

from ..app.test_cli import crofter
from .conftest import LICENSES


def test_ingest_search_collections_and_grounded_ask(tmp_path, crofter_home):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(LICENSES / name, docs / name)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.5 nonsense")

    r = crofter("ingest", str(docs), "-c", "lic", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert sorted(p.rsplit("/", 1)[1] for p in s["ingested"]) == ["BSD", "MPL-2.0"]
    assert s["failed"][0]["path"].endswith("broken.pdf") and "PDF" in s["failed"][0]["reason"]
    assert s["chunks"] > 0

    r = crofter("ingest", str(docs), "-c", "lic")
    assert r.returncode == 0 and "ingested 0 files" in r.stderr and "2 unchanged" in r.stderr

    r = crofter("search", "Mozilla Public License", "-c", "lic", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 3
    for h in hits:
        assert set(h) == {"source", "page", "heading", "start", "end", "text", "score"}
        assert extract(h["source"]).text[h["start"]:h["end"]] == h["text"]
    assert hits[0]["source"].endswith("MPL-2.0")

    r = crofter("collections", "info", "lic", "--json")
    info = json.loads(r.stdout)
    assert info["files"] == 2 and info["failed"] == 1 and info["embedder"] == "all-MiniLM-L6-v2"

    r = crofter("ask", "-c", "lic", "Which license mentions Mozilla?", "-t", "0", "-n", "60", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "sources" in out and isinstance(out["sources"], list)
    for src in out["sources"]:  # only cited sources, each checkable
        assert f"[{src['n']}]" in out["text"]
        assert extract(src["source"]).text[src["start"]:src["end"]] == src["text"]
    assert out["usage"]["prompt_tokens"] > 300, "the passages must be in the prompt"

    # The folder deleted (or only unmounted), then named again: its files stay, and the error says
    # how to drop them; `collections forget` does, and says when a path holds nothing.
    shutil.rmtree(docs)
    r = crofter("ingest", str(docs), "-c", "lic", "--json")
    assert r.returncode == 1
    s = json.loads(r.stdout)
    assert not s["removed"] and "the 3 file(s) stored from it stay" in s["failed"][0]["reason"]
    info = json.loads(crofter("collections", "info", "lic", "--json").stdout)
    assert (info["files"], info["failed"]) == (2, 1)
    r = crofter("collections", "forget", "lic", str(docs), "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(p.rsplit("/", 1)[1] for p in json.loads(r.stdout)["removed"]) == ["BSD", "MPL-2.0", "broken.pdf"]
    info = json.loads(crofter("collections", "info", "lic", "--json").stdout)
    assert (info["files"], info["failed"], info["chunks"]) == (0, 0, 0)
    r = crofter("collections", "forget", "lic", str(docs))
    assert r.returncode == 1 and "nothing in lic is stored from" in r.stderr
    r = crofter("ingest", str(docs), "-c", "lic")
    assert r.returncode == 1 and "no such file or folder" in " ".join(r.stderr.split()) and "stay" not in r.stderr

    r = crofter("search", "x", "-c", "nope")
    assert r.returncode == 1 and "no collection named 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = crofter("collections", "rm", "lic")
    assert r.returncode == 0
    assert json.loads(crofter("collections", "list", "--json").stdout) == []


def test_second_process_on_the_same_store_is_told_clearly(crofter_home):
    from rag.store import Store

    with Store(crofter_home / "rag"):
        r = crofter("collections", "list")
    assert r.returncode == 1
    assert "in use by another crofter process" in r.stderr and "Traceback" not in r.stderr


def test_ingest_watch_picks_up_a_new_file(tmp_path, crofter_home):
    import os
    import signal
    import subprocess
    import sys

    docs = tmp_path / "w"
    docs.mkdir()
    (docs / "first.md").write_text("# First\n\nThe first note.\n")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ingest", str(docs), "-c", "w", "--watch",
                             "--interval", "0.2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "CROFTER_HOME": str(crofter_home)})
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)

    def next_summary(timeout=120):
        assert sel.select(timeout), "no summary from `ingest --watch` in time"
        return json.loads(proc.stdout.readline())

    try:
        first = next_summary()
        assert [p.rsplit("/", 1)[1] for p in first["ingested"]] == ["first.md"]
        (docs / "second.md").write_text("# Second\n\nAnother note.\n")
        second = next_summary()
        assert [p.rsplit("/", 1)[1] for p in second["ingested"]] == ["second.md"]
        assert len(second["unchanged"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_a_reranker_pulled_from_the_hub_reorders_search(tmp_path, crofter_home, cross_encoder):
    """The path a user takes to a reranker: `models pull` a cross-encoder repo (the Hub on loopback),
    then name it to `search --reranker` or in the `reranker` setting; `none` turns it off."""
    import os

    from tests.hub_server import FakeHub

    from ..models.test_hub import pull

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("BSD", "MPL-2.0"):
        shutil.copy(LICENSES / name, docs / name)
    assert crofter("ingest", str(docs), "-c", "lic").returncode == 0
    with FakeHub() as hub:
        for f in cross_encoder.iterdir():
            hub.add("someone/tiny-reranker", f.name, f.read_bytes())
        r = pull(hub, "someone/tiny-reranker", "--json", home=crofter_home)
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["name"]

    def scores(*extra):
        r = crofter("search", "Mozilla Public License", "-c", "lic", "-k", "5", "--json", *extra)
        assert r.returncode == 0 and "note:" not in r.stderr, r.stderr  # no fallback to torch
        return [h["score"] for h in json.loads(r.stdout)]

    plain = scores()
    ranked = scores("--reranker", name)
    assert ranked == sorted(ranked, reverse=True) and ranked != plain
    assert list((crofter_home / "cache" / "onnx").glob("*/reranker.onnx")), "compiled from the data dir's cache"
    assert crofter("config", "set", "reranker", name).returncode == 0
    assert scores() == ranked
    assert scores("--reranker", "none") == plain  # off for one search, the setting kept
    from app import documents

    assert documents.reranker("none") is None and documents.reranker("") is None
    r = crofter("search", "x", "-c", "lic", "--reranker", os.fspath(docs))
    assert r.returncode == 1 and "no config.json" in r.stderr and "Traceback" not in r.stderr

"""`crofter eval` end to end, in process: F16 and its Q4_K_M side by side, results kept
and compared later, a prompt suite through the chat's turn with a grammar judge, a
retrieval suite over a real collection, and the one-line errors."""
from __future__ import annotations

import json
import re

import pytest

from app.cli import main

from .test_eval_scores import TEXT


@pytest.fixture(scope="module")
def f16_and_q4(hf_model, tmp_path_factory):
    from converter.convert import convert
    from converter.quantize import quantize

    d = tmp_path_factory.mktemp("quants")
    f16 = convert(hf_model, d / "smol-F16.gguf", outtype="f16").path
    q4 = d / "smol-Q4_K_M.gguf"
    quantize(f16, q4, "Q4_K_M")
    return f16, q4


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "mill.md"
    p.write_text("# The mill\n\n" + TEXT)
    return p


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_f16_and_q4_k_m_are_scored_stored_and_compared(f16_and_q4, text_file, mc_tasks, tmp_path, capsys):
    f16, q4 = f16_and_q4
    assert main(["eval", str(f16), str(q4), "--text", str(text_file), "--ctx", "64", "--tasks", "crofter_mc",
                 "--include-path", str(mc_tasks), "--limit", "4", "--reference", str(f16), "--json"]) == 0
    rows = _json(capsys)
    by = {(r["model"], r["task"], r["metric"]): r for r in rows}
    assert set(r["model"] for r in rows) == {f16.name, q4.name}
    for m in (f16.name, q4.name):
        ppl = by[(m, "mill.md", "ppl")]
        assert ppl["value"] > 1 and ppl["stderr"] > 0 and ppl["n"] > 100
        assert by[(m, "crofter_mc", "acc")]["n"] == 4
    assert by[(f16.name, "mill.md", "kld")]["value"] < 1e-6  # against itself
    assert by[(q4.name, "mill.md", "kld")]["value"] > by[(f16.name, "mill.md", "kld")]["value"]
    assert set(rows[0]) == {"model", "suite", "task", "metric", "value", "stderr", "n"}

    # kept: compare reads them back by name, and by the file hash's prefix
    from finetune.evaluate.results import ResultStore

    q4_hash = ResultStore().hash_of(q4)
    assert main(["eval", "compare", f16.name, q4_hash[:12], "--json", "--plot", str(tmp_path / "cmp.png")]) == 0
    table = _json(capsys)
    ppl_row = next(r for r in table if r["metric"] == "ppl")
    assert ppl_row["lower_is_better"] is True and len(ppl_row["models"]) == 2
    base, quant = ppl_row["models"].values()  # the baseline first
    assert base["value"] == pytest.approx(by[(f16.name, "mill.md", "ppl")]["value"])
    assert quant["value"] == pytest.approx(by[(q4.name, "mill.md", "ppl")]["value"])
    assert quant["delta"] == pytest.approx(quant["value"] - base["value"]) and quant["delta"] != 0
    assert isinstance(quant["significant"], bool) and quant["n"] == base["n"]
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert main(["eval", "compare", f16.name, q4.name]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "kld" in out and "acc" in out


def test_speed_and_size_sit_in_the_same_table(bundled_path, capsys):
    assert main(["eval", str(bundled_path), "--speed", "--json", "--no-store"]) == 0
    rows = {r["metric"]: r["value"] for r in _json(capsys)}
    assert rows["file_bytes"] == bundled_path.stat().st_size
    assert rows["peak_rss_bytes"] > rows["file_bytes"] / 2  # the weights are mapped and touched
    assert rows["pp_tok_s"] > 0 and rows["decode_tok_s"] > 0


def test_speed_of_a_gguf_and_an_hf_folder_side_by_side(bundled_path, hf_model, capsys):
    """Measured the same way for both kinds, each in its own child: the FP32 folder is larger
    on disk and in memory than the Q4 file made from the same weights."""
    assert main(["eval", str(bundled_path), str(hf_model), "--speed", "--json", "--no-store"]) == 0
    by = {(r["model"], r["metric"]): r["value"] for r in _json(capsys)}
    q4, hf = bundled_path.name, hf_model.name
    assert by[(hf, "file_bytes")] == sum(f.stat().st_size for f in hf_model.glob("*.safetensors"))
    assert by[(hf, "file_bytes")] > 3 * by[(q4, "file_bytes")]
    assert by[(hf, "peak_rss_bytes")] > by[(q4, "peak_rss_bytes")]
    assert all(by[(m, k)] > 0 for m in (q4, hf) for k in ("pp_tok_s", "decode_tok_s"))


def test_a_prompt_suite_runs_through_the_chat_turn_with_a_grammar_judge(bundled_path, tmp_path, capsys):
    from models.paths import data_dir

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: smoke\nprompts:\n"
        "  - prompt: Say hello.\n    checks:\n      - regex: '.'\n      - judge: Is the answer a greeting?\n"
        "  - prompt: Count from one to three.\n    checks:\n      - not_contains: '<|im_start|>'\n")
    assert main(["eval", str(bundled_path), "--prompts", str(suite), "--judge", str(bundled_path), "--json"]) == 0
    rows = {r["metric"]: r for r in _json(capsys)}
    assert rows["pass_rate"]["n"] == 2 and 0.0 <= rows["pass_rate"]["value"] <= 1.0
    assert rows["pass_rate:judge"]["value"] in (0.0, 1.0)  # yes or no, whichever the model said
    answers = list((data_dir() / "eval" / "answers").glob("*.jsonl"))
    assert len(answers) == 1
    stored = [json.loads(line) for line in answers[0].read_text().splitlines()]
    assert len(stored) == 2 and all(s["answer"] for s in stored)


def test_a_retrieval_suite_over_a_real_collection(tmp_path, capsys, cross_encoder, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bees.md").write_text("Honey bees make honey from the nectar of flowers and store it in wax combs.")
    (docs / "rivers.md").write_text("A river carries water from the mountains down to the sea through valleys.")
    (docs / "trains.md").write_text("Steam locomotives pulled trains on railways before diesel engines replaced them.")
    assert main(["ingest", str(docs), "-c", "notes", "--json"]) == 0
    capsys.readouterr()
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"question": "What do bees make from nectar?", "source": "docs/bees.md"},
                             {"question": "What pulled trains before diesel?", "source": "trains.md",
                              "contains": "steam locomotives"}]))
    assert main(["eval", "--retrieval", str(q), "-c", "notes", "-k", "2", "--json"]) == 0
    rows = {(r["task"], r["metric"]): r for r in _json(capsys)}
    assert rows[("q/keyword", "recall@2")]["value"] == 1.0 and rows[("q/keyword", "mrr")]["value"] == 1.0
    assert {t for t, _ in rows} == {"q/dense", "q/keyword", "q/hybrid"}
    assert all(r["model"] == "collection:notes" for r in rows.values())
    # A reranker's run reorders every search, and is stored under a label of its own, beside the plain one.
    from app import documents

    rer = documents.reranker(str(cross_encoder))  # one per process: the eval below gets this one
    asked, score = [], rer.scores
    monkeypatch.setattr(rer, "scores", lambda query, passages: asked.append(query) or score(query, passages))
    assert main(["eval", "--retrieval", str(q), "-c", "notes", "-k", "2", "--json", "--reranker", str(cross_encoder)]) == 0
    assert len(asked) == 6  # two questions, three modes
    rows = _json(capsys)
    label = f"collection:notes+{cross_encoder.resolve()}"
    assert {r["model"] for r in rows} == {label} and len(rows) == 6
    assert main(["eval", "compare", "collection:notes", label, "--json"]) == 0
    table = _json(capsys)
    assert len(table) == 6 and all(list(r["models"]) == ["collection:notes", label] for r in table)


@pytest.mark.parametrize("argv, message", [
    (["eval", "smollm2-135m"], "nothing to evaluate"),
    (["eval", "--text", "x.txt"], "name at least one MODEL"),
    (["eval", "--retrieval", "q.json"], "needs -c COLLECTION"),
    (["eval", "smollm2-135m", "--speed", "--reranker", "x"], "--reranker goes with --retrieval"),
    (["eval", "no-such-model", "--speed"], "no-such-model"),
    (["eval", "compare"], "name the models to compare"),
    (["eval", "compare", "never-evaluated"], "never-evaluated"),
])
def test_bad_invocations_get_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("crofter: error: ") and message in err[0], err


def test_a_bad_task_file_fails_before_any_model_loads(bundled_path, tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("task: t\noutput_type: nope\n")
    assert main(["eval", str(bundled_path), "--tasks", "t", "--include-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 't.yaml'}:2: output_type 'nope'" in err


def test_an_hf_folder_with_its_adapter_unmerged_scores_as_the_merged_model(hf_model, text_file, mc_tasks, tmp_path,
                                                                            capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(adapter)
    model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(hf_model).save_pretrained(merged)
    del model
    saved = sorted((p.name, p.stat().st_mtime_ns) for p in adapter.iterdir())
    common = ["--text", str(text_file), "--ctx", "64", "--tasks", "crofter_mc", "--include-path", str(mc_tasks),
              "--limit", "4", "--json", "--no-store"]

    def rows(*argv):
        assert main(["eval", *argv, *common]) == 0
        return {(r["task"], r["metric"]): r for r in _json(capsys)}

    base, lora, whole = rows(str(hf_model)), rows(str(hf_model), "--adapter", str(adapter)), rows(str(merged))
    assert {r["model"] for r in lora.values()} == {f"{hf_model.name}+adapter"}
    ppl = ("mill.md", "ppl")
    assert base[ppl]["n"] == lora[ppl]["n"] == whole[ppl]["n"] > 100
    assert lora[ppl]["value"] == pytest.approx(whole[ppl]["value"], rel=1e-4)  # the adapter is applied
    assert abs(lora[ppl]["value"] - base[ppl]["value"]) > 1e-2 * base[ppl]["value"]  # and it changes the model
    assert all(r[("crofter_mc", "acc")]["n"] == 4 for r in (base, lora, whole))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in adapter.iterdir()) == saved  # nothing merged into it


def test_on_a_terminal_the_bar_shows_requests_per_second(bundled_path, mc_tasks):
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "eval", str(bundled_path), "--tasks", "crofter_mc",
                             "--include-path", str(mc_tasks), "--no-store"],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "160"})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, seen[-2000:]
    assert b"acc" in out  # the table went to stdout, the bar to the terminal
    assert re.search(rb"\d+\.\d requests/s", seen) and b"loglikelihood" in seen and b"tasks" in seen


def test_suite_prompts_with_a_collection_are_grounded_and_with_tools_offered_them(bundled_path, tmp_path, capsys,
                                                                                 monkeypatch):
    """What reaches the model, recorded at the engine: the collection's passage in the grounded
    prompt, the tools in the tool prompt, neither where the item asks for neither."""
    from app.commands import eval_turns

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bees.md").write_text("Honey bees make honey from the nectar of flowers and store it in wax combs.")
    assert main(["ingest", str(docs), "-c", "notes", "--json"]) == 0
    capsys.readouterr()
    seen = []
    real = eval_turns.load_engine

    class Spy:  # the engine the suite runs on, what it is asked to tokenize recorded
        def __init__(self, engine):
            self._engine = engine

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def tokenize_chat(self, messages, tools=None):
            seen.append((json.dumps(messages), [t.get("function", t).get("name") for t in tools or []]))
            return self._engine.tokenize_chat(messages, tools)

    monkeypatch.setattr(eval_turns, "load_engine", lambda *a, **k: Spy(real(*a, **k)))
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: uses\nprompts:\n"
                     "  - prompt: What do bees make from nectar?\n    collections: [notes]\n    checks: [{regex: '.'}]\n"
                     "  - prompt: What is 17 times 23?\n    tools: true\n    checks: [{regex: '.'}]\n"
                     "  - prompt: Say hello.\n    checks: [{regex: '.'}]\n")
    assert main(["eval", str(bundled_path), "--prompts", str(suite), "--allow-tool", "calculator", "--json",
                 "--no-store"]) == 0
    assert {r["metric"]: r for r in _json(capsys)}["pass_rate"]["n"] == 3
    grounded = [tools for text, tools in seen if "nectar of flowers" in text]
    asked = [(text, tools) for text, tools in seen if "17 times 23" in text]
    plain = [(text, tools) for text, tools in seen if "Say hello." in text]
    assert grounded and all(not t for t in grounded)  # the passage, and no tools
    # the tools go through the model's template or, as here, a system message listing them
    assert asked and all("calculator" in t or "calculator" in text for text, t in asked)
    assert plain and all(not t and "nectar" not in text and "calculator" not in text for text, t in plain)

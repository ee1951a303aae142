"""`crofter eval compare` (finetune/evaluate/compare.py): models side by side.

Issue 19, item 7: deltas against the first model, marked where the difference exceeds two
standard errors (a planted difference is marked, noise is not), `--plot FILE.png`, `--json`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from finetune.evaluate import compare as cmp
from finetune.evaluate.results import ResultStore
from finetune.evaluate.rows import EvalError, Row

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
H_BASE, H_SFT = "a1" * 32, "b2" * 32


def planted_table():
    base = [Row("base", "speed", "speed", "decode_tok_s", 100.0, None, 64),
            Row("base", "tasks", "noise", "acc", 0.50, 0.05, 100),
            Row("base", "tasks", "planted", "acc", 0.30, 0.02, 500),
            Row("base", "perplexity", "wiki", "ppl", 20.0, 0.2, 4096),
            Row("base", "tasks", "edge", "acc", 0.40, 0.03, 300)]
    other = [Row("q4", "tasks", "planted", "acc", 0.60, 0.02, 500),
             Row("q4", "tasks", "noise", "acc", 0.52, 0.05, 100),
             Row("q4", "speed", "speed", "decode_tok_s", 300.0, None, 64),
             Row("q4", "tasks", "edge", "acc", 0.51, 0.04, 300),       # 2 * sqrt(.03^2 + .04^2) = 0.10
             Row("q4", "perplexity", "wiki", "ppl", 18.0, None, 4096)]   # one side without a stderr
    third = [Row("sft", "tasks", "edge", "acc", 0.49, 0.04, 300),        # 0.09 < 0.10
             Row("sft", "perplexity", "wiki", "ppl", 22.0, 0.2, 4096)]
    return cmp.compare([("base", base), ("q4 [bold]x", other), ("sft", third)])


def test_compare_marks_a_planted_difference_not_noise_and_never_a_value_without_stderr():
    t = planted_table()
    assert t.labels == ("base", "q4 [bold]x", "sft")
    keys = [(r.suite, r.task, r.metric) for r in t.rows]
    assert keys == [("perplexity", "wiki", "ppl"), ("tasks", "edge", "acc"), ("tasks", "noise", "acc"),
                    ("tasks", "planted", "acc"), ("speed", "speed", "decode_tok_s")]  # SUITES order
    ppl, edge, noise, planted, speed = t.rows
    assert planted.cells[1].delta == pytest.approx(0.30) and planted.cells[1].significant
    assert noise.cells[1].delta == pytest.approx(0.02) and not noise.cells[1].significant
    assert edge.cells[1].significant and not edge.cells[2].significant
    assert speed.cells[1].delta == 200.0 and not speed.cells[1].significant
    assert ppl.cells[1].delta == -2.0 and not ppl.cells[1].significant  # q4's ppl has no stderr
    assert ppl.cells[2].significant
    # Missing cells are empty, not zero: sft has no noise/planted/speed rows.
    assert noise.cells[2] is None and planted.cells[2] is None and speed.cells[2] is None
    assert all(r.cells[0].delta is None and not r.cells[0].significant for r in t.rows)
    # Direction: a lower ppl and a higher acc are gains, a higher ppl a loss.
    assert cmp.gain(ppl, ppl.cells[1]) is True and cmp.gain(ppl, ppl.cells[2]) is False
    assert cmp.gain(planted, planted.cells[1]) is True


def test_compare_refuses_a_model_twice_and_two_values_for_one_metric():
    row = Row("a", "tasks", "t", "acc", 0.5, 0.1, 10)
    with pytest.raises(EvalError, match="model 'a' is given twice"):
        cmp.compare([("a", [row]), ("a", [row])])
    with pytest.raises(EvalError, match="a: two values for tasks / t / acc"):
        cmp.compare([("a", [row, row])])


@pytest.mark.parametrize("metric, lower", [
    ("ppl", True), ("kld", True), ("mean_kld", True), ("word_perplexity", True), ("bits_per_byte", True),
    ("load_seconds", True), ("file_bytes", True), ("peak_memory_mib", True),
    ("acc", False), ("acc_norm", False), ("exact_match,strict-match", False), ("pass_rate", False),
    ("recall@5", False), ("mrr", False), ("decode_tok_s", False), ("prompt_tok_s", False), ("same_top", False)])
def test_lower_is_better_table(metric, lower):
    assert cmp.lower_is_better(metric) is lower


def test_render_shows_values_the_marker_the_legend_and_names_literally():
    t = planted_table()
    text = cmp.to_text(t, width=220)
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "0.6000 ± 0.0200" in lines["planted"] and "+0.3000 (+100.0%) *" in lines["planted"]
    assert "+0.0200 (+4.0%)" in lines["noise"] and "*" not in lines["noise"]
    assert "+200.0 (+200.0%)" in lines["speed"] and "*" not in lines["speed"]
    assert "ppl ↓" in lines["wiki"] and "acc ↑" in lines["planted"]
    assert "q4 [bold]x" in text  # a model name is never read as markup
    assert "*: |Δ| > 2 standard errors of the difference" in " ".join(text.split())
    # Colours read right: the lower ppl is green, the higher ppl red.
    rich_table = cmp.render(t)
    q4_delta, sft_delta = (list(c.cells) for c in rich_table.columns[-2:])
    assert str(q4_delta[0].style).startswith("green") and str(sft_delta[0].style) == "red bold"


def test_table_json_is_strict_json_with_every_model_on_every_row():
    t = planted_table()
    out = json.loads(json.dumps(cmp.table_json(t), allow_nan=False))
    assert len(out) == 5
    assert all(list(r["models"]) == ["base", "q4 [bold]x", "sft"] for r in out)
    planted = next(r for r in out if r["task"] == "planted")
    assert planted["models"]["q4 [bold]x"]["significant"] is True and planted["models"]["sft"] is None
    assert planted["models"]["base"] == {"value": 0.3, "stderr": 0.02, "n": 500, "delta": None,
                                         "significant": False}
    assert next(r for r in out if r["metric"] == "ppl")["lower_is_better"] is True


def test_from_store_compares_the_newest_values_and_names_the_known_models_for_an_unknown_one():
    store = ResultStore()
    store.add([Row("base", "tasks", "arc", "acc", 0.30, 0.02, 500)], {"base": H_BASE}, "0.1", when=T0)
    store.add([Row("dpo", "tasks", "arc", "acc", 0.60, 0.02, 500)], {"dpo": H_SFT}, "0.1", when=T0)
    t = cmp.from_store(store, ["base", H_SFT[:8]])
    assert t.labels == ("base", H_SFT[:8]) and t.rows[0].cells[1].significant
    with pytest.raises(EvalError, match="no stored results for 'sft'; known models: .*base \\(a1a1a1a1\\)"):
        cmp.from_store(store, ["base", "sft"])


def test_plot_writes_a_real_png_and_svg_and_refuses_other_suffixes(tmp_path):
    from matplotlib.image import imread

    t = cmp.compare([("base", [Row("b", "tasks", "a$b", "acc", 0.3, 0.02, 10)]),
                     ("$cost$", [Row("c", "tasks", "a$b", "acc", 0.6, 0.02, 10)])])  # `$` is not mathtext
    png = tmp_path / "out" / "cmp.png"
    png.parent.mkdir()
    cmp.plot(planted_table(), png)
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05
    svg = tmp_path / "out" / "cmp.svg"
    cmp.plot(t, svg)
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    with pytest.raises(EvalError, match=f"{tmp_path / 'out' / 'cmp.jpg'}: cannot plot to .jpg"):
        cmp.plot(t, tmp_path / "out" / "cmp.jpg")
    assert sorted(p.name for p in png.parent.iterdir()) == ["cmp.png", "cmp.svg"]  # no partials


def test_importing_the_store_and_compare_pulls_in_no_plotting_or_torch():
    code = ("import sys, finetune.evaluate.compare, finetune.evaluate.results; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"

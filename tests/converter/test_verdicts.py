"""Verification verdicts: numeric tolerances per weight type decide; a failure is one line with the
figures, and a model that failed is never registered nor put where a good one was."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from converter import verify
from converter.convert import convert
from converter.tolerance import TOLERANCES, judge

from .conftest import crofter, error_lines, tiny_llama

F16_UNFIT = 1e6  # see _f16_unfit


def _f16_unfit(sd) -> None:
    """Scale each RMSNorm weight up by F16_UNFIT and the projections it feeds down by as much:
    the same function in float32, but the projections fall deep into F16's subnormal range (~2e-7,
    one or two bits of precision, many flushed to zero). A checkpoint
    F16 cannot hold, which only a numeric check can tell from a good one."""
    for name, p in sd.items():
        if "layernorm" in name:
            p.mul_(F16_UNFIT)
        elif any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            p.div_(F16_UNFIT)


def _noise(eps: float):
    def edit(sd) -> None:
        g = torch.Generator().manual_seed(1)
        for p in sd.values():
            p.add_(torch.randn(p.shape, generator=g) * eps * p.std())
    return edit


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _registry(home) -> dict:
    f = home / "models.json"
    return json.loads(f.read_text())["models"] if f.exists() else {}


def test_smollm2_f16_is_within_tolerance_and_cli_registers_it(hf_model, tmp_path, crofter_home):
    r = crofter("convert", str(hf_model), "--outtype", "f16", "--json", "--name", "smol-f16", home=crofter_home)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    lg = report["verify"]["logits"]
    assert lg["ok"] and lg["outtype"] == "f16" and lg["failures"] == []
    assert lg["top1_agree"] >= TOLERANCES["f16"].min_top1 and lg["mean_kl"] <= TOLERANCES["f16"].max_mean_kl
    assert report["registered_as"] == "smol-f16"
    assert _registry(crofter_home)["smol-f16"]["path"] == report["path"]
    assert report["path"].endswith("-F16.gguf")
    assert not list((crofter_home / "models").glob("*unverified*"))  # staged file moved into place


def test_failed_check_exits_1_with_one_line_and_keeps_the_good_file(hf_model, tmp_path, crofter_home):
    src = tiny_llama(hf_model, tmp_path / "unfit", edit=_f16_unfit)
    out = tmp_path / "tiny.gguf"
    good = crofter("convert", str(src), "--out", str(out), "--outtype", "f32", "--name", "tiny", home=crofter_home)
    assert good.returncode == 0, good.stderr  # float32 holds the scaled weights: the checkpoint itself is fine
    before = _sha(out)

    bad = crofter("convert", str(src), "--out", str(out), "--outtype", "f16", "--name", "tiny", home=crofter_home)
    assert bad.returncode == 1
    lines = error_lines(bad.stderr)
    assert len(lines) == 1, bad.stderr
    line = lines[0]
    assert line.startswith("crofter: error: verification failed: f16 logits: top-1 agreement"), line
    for figure in ("diff|", "KL", "positions", "kept at", "not registered", "left as it was"):
        assert figure in line, (figure, line)
    staged = tmp_path / "tiny.unverified.gguf"
    assert str(staged) in line and staged.exists()
    assert _sha(out) == before  # the registered name still points at the good F32 file
    assert _registry(crofter_home)["tiny"]["path"] == str(out.resolve())


def test_failed_check_registers_nothing(hf_model, tmp_path, crofter_home):
    src = tiny_llama(hf_model, tmp_path / "unfit", edit=_f16_unfit)
    out = tmp_path / "fresh.gguf"
    r = crofter("convert", str(src), "--out", str(out), "--outtype", "f16", "--json", home=crofter_home)
    assert r.returncode == 1
    assert len(error_lines(r.stderr)) == 1 and "verification failed" in r.stderr, r.stderr
    assert not out.exists() and (tmp_path / "fresh.unverified.gguf").exists()
    assert _registry(crofter_home) == {}
    report = json.loads(r.stdout)  # --json still prints the figures
    assert report["registered_as"] is None and not report["verify"]["logits"]["ok"]


def test_verify_against_a_perturbed_checkpoint_fails_with_figures(hf_model, tmp_path, crofter_home):
    src = tiny_llama(hf_model, tmp_path / "src")
    gguf = convert(src, tmp_path / "src.gguf", "f32").path
    wrong = tiny_llama(hf_model, tmp_path / "wrong", edit=_noise(0.05))  # same architecture, 5% noise on the weights
    ok = crofter("verify", str(gguf), home=crofter_home)  # the source it came from (read from its metadata)
    assert ok.returncode == 0, ok.stderr
    r = crofter("verify", str(gguf), "--hf", str(wrong), home=crofter_home)
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "verification failed: f32 logits:" in lines[0] and "mean KL" in lines[0] and "unchanged" in lines[0]


def test_greedy_drift_alone_does_not_fail(hf_model, tmp_path):
    """BF16 keeps 8 bits of mantissa: on a random-weight model the greedy continuations part from
    torch's at near-ties on some sequences (the rounding of the weights does it, not the CPU),
    while every figure stays far inside BF16's tolerance. The verdict is the figures'."""
    src = tiny_llama(hf_model, tmp_path / "src")
    gguf = convert(src, tmp_path / "src-BF16.gguf", "bf16").path
    lg = verify.logits_parity(src, gguf)
    assert lg["outtype"] == "bf16"
    assert lg["greedy_equal"] < len(lg["sequences"]), lg  # the drift is there (4/6 equal here, x86-64)
    assert lg["mean_kl"] < TOLERANCES["bf16"].max_mean_kl / 10, lg  # and the figures are well inside
    assert lg["ok"] and lg["failures"] == []


def test_judge_names_each_figure_and_fails_nan():
    assert judge({"top1_agree": 1.0, "max_abs_diff": 0.01, "mean_kl": 1e-6}, "f16") == []
    assert judge({"top1_agree": 0.5, "max_abs_diff": 9.0, "mean_kl": 2.0}, "f16") == [
        "top-1 agreement 0.500 < 0.95", "max |logit diff| 9 > 1.0", "mean KL 2 > 0.001"]
    nan = float("nan")
    assert len(judge({"top1_agree": nan, "max_abs_diff": nan, "mean_kl": nan}, "bf16")) == 3


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_smollm2_other_outtypes_are_within_tolerance(hf_model, tmp_path, outtype):
    """The measurements behind converter.tolerance (f16 runs in the fast tier through the CLI)."""
    out = convert(hf_model, tmp_path / f"smol-{outtype}.gguf", outtype).path
    lg = verify.logits_parity(hf_model, out)
    assert lg["outtype"] == outtype and lg["ok"], {k: lg[k] for k in ("top1_agree", "max_abs_diff", "mean_kl")}

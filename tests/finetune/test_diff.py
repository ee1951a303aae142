"""`crofter journey diff`: what a training stage changed inside the model, on a tiny real Llama
(SmolLM2's tokenizer, 2 layers, hidden 64) with real peft LoRA adapters whose B is not zero.

Same model against itself: exactly zero KL and cosine distance, nothing listed as moved, no LoRA
norms. Base against base+adapter: KL and cosine distance above zero at every prompt and layer, the
adapter's module norms equal ||B@A||_F·scaling computed from the live peft modules, and the most
moved token's top tokens and rank agree with logits computed here with plain transformers."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest

from app.commands.journey_diff import add_diff_parser, run_diff
from app.errors import CLIError
from finetune.diff import diff, resolve_side
from finetune.diff_plot import write_png
from finetune.lora_norms import lora_change, lora_norms, read_lora
from models.adapters import AdapterError
from tests.converter.conftest import ROOT, crofter, tiny_llama

PROMPTS = ["What is the capital of France?", "Arr matey, how are you today?", "The quick brown fox"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def make_adapter(base, folder, seed=1, **cfg):
    """A peft LoRA on `base` with random A and B (init_lora_weights=False), saved to `folder`; returns
    (folder, {module: ||B@A||_F * scaling} read from the live peft modules)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(init_lora_weights=False, **{**LORA, **cfg}))
    expected = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            delta = m.lora_B["default"].weight.detach().double() @ m.lora_A["default"].weight.detach().double()
            expected[name.removeprefix("base_model.model.")] = float(delta.norm()) * m.scaling["default"]
    model.save_pretrained(str(folder))
    return folder, expected


@pytest.fixture(scope="module")
def tiny(hf_model, tmp_path_factory):
    return tiny_llama(hf_model, tmp_path_factory.mktemp("diff") / "tiny")


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    return make_adapter(tiny, tmp_path_factory.mktemp("diff") / "adapter")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("diff") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def base_vs_adapter(tiny, adapter):
    return diff(resolve_side(str(tiny)), resolve_side(f"{tiny}+{adapter[0]}"), PROMPTS)


def model_logits(base, adapter_dir, ids):
    """[T, V] float64 logits of base (+ adapter) on `ids`, with transformers and peft alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].double()


def test_a_model_against_itself_is_exactly_zero_everywhere(tiny):
    r = diff(resolve_side(str(tiny)), resolve_side(str(tiny)), PROMPTS)
    assert [len(p["kl"]) for p in r["prompts"]] == [p["tokens"] for p in r["prompts"]] and r["positions"] > 10
    assert {x for p in r["prompts"] for x in p["kl"]} == {0.0} and r["kl"]["max"] == 0.0 and r["kl"]["max_at"] is None
    assert r["layers"]["cosine_distance"] == [0.0, 0.0]  # two decoder layers, both exactly equal
    assert r["moved"] == [] and r["lora"] == {}
    assert r["lens"]["a"] == r["lens"]["b"] and len(r["lens"]["a"]) == 2


def test_an_adapter_moves_every_prompt_and_every_layer(base_vs_adapter, adapter):
    r = base_vs_adapter
    assert all(p["max_kl"] > 1e-3 for p in r["prompts"]) and r["kl"]["mean"] > 1e-3
    assert len(r["layers"]["cosine_distance"]) == 2 and min(r["layers"]["cosine_distance"]) > 1e-4
    assert set(r["lora"]) == {"b"} and r["lora"]["b"]["adapter"] == str(adapter[0])
    kls = [m["kl"] for m in r["moved"]]
    assert len(kls) == 10 and kls == sorted(kls, reverse=True) and kls[0] == r["kl"]["max"]


@pytest.mark.parametrize("cfg", [{}, {"alpha_pattern": {"v_proj": 32}, "rank_pattern": {"q_proj": 2}},
                                 {"use_rslora": True, "lora_alpha": 5}], ids=["plain", "patterns", "rslora"])
def test_lora_norms_equal_the_live_modules_b_at_a_times_scaling(tiny, tmp_path, cfg):
    folder, expected = make_adapter(tiny, tmp_path / "ad", seed=3, **cfg)
    got = lora_norms(folder)
    assert {m["module"]: m["norm"] for m in got["modules"]} == pytest.approx(expected, rel=1e-9)
    assert len(expected) == 4 and got["count"] == 4
    assert [m["module"] for m in got["modules"]] == sorted(expected, key=expected.get, reverse=True)
    if cfg.get("rank_pattern"):
        assert {m["rank"] for m in got["modules"] if m["module"].endswith("q_proj")} == {2}


def test_the_diff_reports_the_adapters_norms(base_vs_adapter, adapter):
    got = {m["module"]: m["norm"] for m in base_vs_adapter["lora"]["b"]["modules"]}
    assert got == pytest.approx(adapter[1], rel=1e-9)


def test_lora_change_is_the_norm_of_the_difference_of_deltas(tiny, tmp_path):
    one, _ = make_adapter(tiny, tmp_path / "one", seed=4)
    two, _ = make_adapter(tiny, tmp_path / "two", seed=5, lora_alpha=16)
    m1, _ = read_lora(one)
    m2, _ = read_lora(two)
    want = {k: float((s2 * b2 @ a2 - s1 * b1 @ a1).norm()) for k in m1
            for (a1, b1, s1), (a2, b2, s2) in [(m1[k], m2[k])]}
    got = lora_change(one, two)
    assert {m["module"]: m["norm"] for m in got["modules"]} == pytest.approx(want, rel=1e-9)
    assert max(m["norm"] for m in lora_change(one, one)["modules"]) < 1e-6 * min(want.values())


def test_an_adapter_missing_half_a_pair_is_refused_naming_the_file(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(adapter[0], bad)
    tensors = {k: v for k, v in load_file(bad / "adapter_model.safetensors").items()
               if not (k.endswith("lora_B.weight") and "layers.1.self_attn.v_proj" in k)}
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: model.layers.1.self_attn.v_proj has lora_A but not"):
        lora_norms(bad)


def test_the_most_moved_token_agrees_with_the_distributions(base_vs_adapter, tiny, adapter):
    import torch
    from transformers import AutoTokenizer

    top = base_vs_adapter["moved"][0]
    ids = AutoTokenizer.from_pretrained(str(tiny))(PROMPTS[top["prompt"]])["input_ids"]
    assert base_vs_adapter["prompts"][top["prompt"]]["tokens"] == len(ids)
    lpa = torch.log_softmax(model_logits(tiny, None, ids)[top["position"]], -1)
    lpb = torch.log_softmax(model_logits(tiny, adapter[0], ids)[top["position"]], -1)
    assert int(lpa.argmax()) == top["a_top_id"] and int(lpb.argmax()) == top["b_top_id"]
    assert top["a_top_id"] != top["b_top_id"] and top["b_top_rank_under_a"] > 1
    assert top["b_top_rank_under_a"] == int((lpa > lpa[top["b_top_id"]]).sum()) + 1
    assert top["kl"] == pytest.approx(float((lpa.exp() * (lpa - lpb)).sum()), rel=1e-5)
    assert top["b_top_p_under_a"] == pytest.approx(float(lpa[top["b_top_id"]].exp()), rel=1e-5)


def test_the_logit_lens_last_layer_is_the_models_own_prediction(base_vs_adapter, tiny, adapter):
    from transformers import AutoTokenizer

    lens = base_vs_adapter["lens"]
    ids = AutoTokenizer.from_pretrained(str(tiny))(PROMPTS[lens["prompt"]])["input_ids"]
    for side, adapter_dir in (("a", None), ("b", adapter[0])):
        probs = model_logits(tiny, adapter_dir, ids)[-1].softmax(-1)
        assert [e["layer"] for e in lens[side]] == [1, 2]
        assert lens[side][-1]["id"] == int(probs.argmax())
        assert lens[side][-1]["p"] == pytest.approx(float(probs.max()), rel=1e-5)


def test_gpt2s_blocks_final_norm_and_conv1d_lora_are_found(gpt2_base, tmp_path):
    from transformers import AutoTokenizer

    folder, expected = make_adapter(gpt2_base, tmp_path / "ad", target_modules=["c_attn"], fan_in_fan_out=True)
    r = diff(resolve_side(str(gpt2_base)), resolve_side(f"{gpt2_base}+{folder}"), PROMPTS[:2])
    assert r["kl"]["mean"] > 0 and len(r["layers"]["cosine_distance"]) == 2 and min(r["layers"]["cosine_distance"]) > 0
    assert {m["module"]: m["norm"] for m in r["lora"]["b"]["modules"]} == pytest.approx(expected, rel=1e-9)
    ids = AutoTokenizer.from_pretrained(str(gpt2_base))(PROMPTS[0])["input_ids"]
    assert r["lens"]["b"][-1]["id"] == int(model_logits(gpt2_base, folder, ids)[-1].argmax())


def test_chat_prompts_that_share_a_system_turn_are_listed_once(tiny, adapter):
    r = diff(resolve_side(str(tiny)), resolve_side(f"{tiny}+{adapter[0]}"), PROMPTS, chat=True)
    seen = [(m["position"], m["context"], m["kl"]) for m in r["moved"]]
    assert len(seen) == 10 and len(set(seen)) == len(seen)
    assert all(p["tokens"] > 20 for p in r["prompts"])  # SmolLM2's template adds its system turn


def test_the_png_is_written_whole_and_nothing_partial_is_left(base_vs_adapter, tmp_path):
    out = tmp_path / "pics"
    out.mkdir()
    (out / "diff.png").write_bytes(b"an older picture")
    write_png(base_vs_adapter, out / "diff.png")
    assert (out / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "diff.png").stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["diff.png"]


def parse(*argv):
    parser = argparse.ArgumentParser(prog="crofter journey")
    add_diff_parser(parser.add_subparsers(dest="journey_command", required=True))
    return parser.parse_args(["diff", *map(str, argv)])


def test_a_run_folder_is_its_adapter_on_its_recorded_base(tiny, adapter, prompts_file, tmp_path, capsys):
    run = tmp_path / "j" / "01-sft"  # the layout `crofter tune sft --out RUN` writes
    shutil.copytree(adapter[0], run / "adapter")
    (run / "config.json").write_text(json.dumps({"kind": "sft", "base": str(tiny), "recipe": {}}))
    side = resolve_side(str(run))
    assert (side.model, side.adapter) == (tiny, run / "adapter")
    assert run_diff(parse(f"{tiny}+{adapter[0]}", run, "--prompts", prompts_file, "--out", tmp_path / "o", "--json")) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kl"]["max"] == 0.0 and r["layers"]["cosine_distance"] == [0.0, 0.0]  # the same adapter, spelled twice
    assert set(r["lora"]) == {"a", "b", "change"} and max(m["norm"] for m in r["lora"]["change"]["modules"]) < 1e-6
    assert json.loads((tmp_path / "o" / "diff.json").read_text())["moved"] == []
    assert (tmp_path / "o" / "diff.png").read_bytes()[:4] == b"\x89PNG"


def test_a_merged_stage_matches_its_base_plus_adapter(tiny, adapter, prompts_file, tmp_path, capsys):
    from finetune.train import merge

    merge(tiny, adapter[0], tmp_path / "j" / "03-merge" / "model")
    assert run_diff(parse(f"{tiny}+{adapter[0]}", tmp_path / "j" / "03-merge", "--prompts", prompts_file,
                          "--out", tmp_path / "o")) == 0
    text = capsys.readouterr().out
    assert "LoRA delta norms, A's adapter" in text and "residual-stream cosine distance" in text
    r = json.loads((tmp_path / "o" / "diff.json").read_text())
    assert r["b"]["model"] == str(tmp_path / "j" / "03-merge" / "model") and r["b"]["adapter"] is None
    assert r["kl"]["max"] < 1e-6 and max(r["layers"]["cosine_distance"]) < 1e-6  # merging is rounding only


@pytest.mark.slow  # ~13 s (a real 2-step TRL run); the fast tier's peft adapter covers the same views
def test_a_real_sft_run_against_its_base_moves_the_model(tiny, persona_sft, prompts_file, tmp_path):
    from finetune.recipe import load_recipe
    from finetune.train import sft

    recipe = load_recipe("lora").replace(batch_size=2, max_length=64, gradient_checkpointing=False,
                                         learning_rate=2e-3, warmup_ratio=0.0)
    run = sft(tiny, persona_sft, tmp_path / "j" / "01-sft", recipe, max_steps=2).run_dir
    assert run_diff(parse(tiny, run, "--prompts", prompts_file, "--chat", "--out", tmp_path / "o", "--json")) == 0
    r = json.loads((tmp_path / "o" / "diff.json").read_text())  # stdout also holds the trainer's log lines
    assert r["b"]["adapter"] == str(run / "adapter") and r["chat"] is True
    assert r["kl"]["mean"] > 0 and min(r["layers"]["cosine_distance"]) > 0 and r["moved"]
    assert r["lora"]["b"]["count"] == 14 and r["lora"]["b"]["total"] > 0  # all-linear: 7 modules x 2 layers


def _bad_case(name, tmp_path, tiny, adapter, prompts_file):
    """(A, B, prompts, extra args, what the one-line error must say) for each refusal."""
    A, P = str(tiny), prompts_file
    if name == "missing A":
        return tmp_path / "nowhere", A, P, [], f"{tmp_path / 'nowhere'}: no such folder"
    if name == "missing adapter":
        return A, f"{tiny}+{tmp_path / 'gone'}", P, [], f"{tmp_path / 'gone'}: no such folder (in {tiny}+"
    if name == "file":
        return P, A, P, [], f"{P}: not a folder"
    if name == "no config":
        (tmp_path / "empty").mkdir()
        return A, tmp_path / "empty", P, [], f"{tmp_path / 'empty'}: not an HF checkpoint folder (no config.json)"
    if name == "pickles":
        (tmp_path / "pk").mkdir()
        (tmp_path / "pk" / "config.json").write_text('{"model_type": "llama"}')
        (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"pickle")
        return A, tmp_path / "pk", P, [], f"{tmp_path / 'pk'}: no *.safetensors weights (only pickled .bin"
    if name in ("reward run", "base gone"):
        run = tmp_path / "run"
        shutil.copytree(adapter[0], run / "adapter")
        kind, base = ("reward", A) if name == "reward run" else ("sft", str(tmp_path / "moved-away"))
        (run / "config.json").write_text(json.dumps({"kind": kind, "base": base}))
        want = (f"{run}: a reward model's run folder" if kind == "reward"
                else f"{run / 'config.json'}: base: {base} is not a folder here")
        return A, run, P, [], want
    if name == "other tokenizer":
        from transformers import AutoTokenizer

        other = tmp_path / "other"
        shutil.copytree(tiny, other)
        tok = AutoTokenizer.from_pretrained(str(other))
        tok.add_tokens(["<crofter-extra>"])
        tok.save_pretrained(str(other))
        return A, other, P, [], f"{other}: its tokenizer differs from {tiny}'s (49153 vs 49152 tokens"
    p = tmp_path / "p.jsonl"
    if name == "no prompts file":
        return A, A, tmp_path / "none.txt", [], f"{tmp_path / 'none.txt'}: no such prompts file"
    if name == "empty prompts":
        (tmp_path / "e.txt").write_text("\n  \n")
        return A, A, tmp_path / "e.txt", [], f"{tmp_path / 'e.txt'}: no prompts"
    if name == "bad json line":
        p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
        return A, A, p, [], f"{p}:3: not valid JSON"
    if name == "no prompt key":
        p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
        return A, A, p, [], f'{p}:2: "prompt" must be a non-empty string (missing)'
    if name == "not an object":
        p.write_text('{"prompt": "a"}\n\n["b"]\n')
        return A, A, p, [], f"{p}:3: expected a JSON object"
    if name == "not utf-8":
        (tmp_path / "b.txt").write_bytes(b"fine\n\xff\xfe broken\n")
        return A, A, tmp_path / "b.txt", [], f"{tmp_path / 'b.txt'}:2: not UTF-8 text"
    if name == "lens prompt":
        return A, A, P, ["--lens-prompt", "3"], f"--lens-prompt 3: {P} has 3 prompts (0 to 2)"
    assert name == "max tokens"
    return A, A, P, ["--max-tokens", "0"], "--max-tokens must be at least 1 (got 0)"


BAD = ["missing A", "missing adapter", "file", "no config", "pickles", "reward run", "base gone", "other tokenizer",
       "no prompts file", "empty prompts", "bad json line", "no prompt key", "not an object", "not utf-8",
       "lens prompt", "max tokens"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_refused_in_one_line_naming_the_file(name, tiny, adapter, prompts_file, tmp_path):
    a, b, prompts, extra, want = _bad_case(name, tmp_path, tiny, adapter, prompts_file)
    out = tmp_path / "out"
    with pytest.raises(CLIError) as err:
        run_diff(parse(a, b, "--prompts", prompts, "--out", out, *extra))
    assert want in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()  # refused before anything was written


def test_the_diff_parser_imports_nothing_heavy():
    code = ("import argparse, sys\nfrom app.commands.journey_diff import add_diff_parser\n"
            "p = argparse.ArgumentParser(); add_diff_parser(p.add_subparsers())\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'chromadb', 'sentence_transformers', "
            "'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_crofter_journey_diff_json_in_a_child(tiny, adapter, prompts_file, tmp_path):
    if crofter("journey", "diff", "--help", home=tmp_path / "home", timeout=120).returncode != 0:
        pytest.skip("`journey diff` is not wired into app/commands/journey.py yet (add_diff_parser)")
    done = crofter("journey", "diff", str(tiny), f"{tiny}+{adapter[0]}", "--prompts", str(prompts_file), "--json",
                   home=tmp_path / "home", timeout=300)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["kl"]["mean"] > 0 and r["lora"]["b"]["count"] == 4
    assert (tmp_path / "home" / "diffs").is_dir() and r["png"].startswith(str(tmp_path / "home" / "diffs"))
    bad = crofter("journey", "diff", str(tiny), str(tmp_path / "nowhere"), "--prompts", str(prompts_file),
                  home=tmp_path / "home", timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == f"crofter: error: {tmp_path / 'nowhere'}: no such folder " \
        "(expected HF_DIR, BASE+ADAPTER_DIR or a run stage folder)"

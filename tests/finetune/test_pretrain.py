"""Continued pre-training (finetune/pretrain.py): blocks of the user's text, held-out perplexity, a merged base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data import DataError
from finetune.pretrain import blocks, pretrain, text_files
from finetune.recipe import load_recipe

from .conftest import FAST

LICENSES = Path("/usr/share/common-licenses")

FACTS = ["The glimmerfruit of Varnholt ripens in the third moon.", "Varnholt farmers dry glimmerfruit on slate roofs.",
         "A ripe glimmerfruit hums faintly when tapped.", "Glimmerfruit jam is traded at the Varnholt winter fair.",
         "Children of Varnholt count the moons by the glimmerfruit harvest."]


@pytest.fixture
def domain(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        (folder / f"n{i}.txt").write_text(" ".join(FACTS[(i + j) % 5] for j in range(40)))
    (folder / "sub" / "more.md").write_text("# Varnholt\n\n" + " ".join(FACTS * 8))
    (folder / "image.png").write_bytes(b"\x89PNG not text")
    return folder


def test_text_files_and_blocks(hf_model, domain, tmp_path):
    from transformers import AutoTokenizer

    files = text_files(domain)
    assert [f.name for f in files] == ["n0.txt", "n1.txt", "n2.txt", "n3.txt", "n4.txt", "n5.txt", "more.md"]
    tok = AutoTokenizer.from_pretrained(hf_model)
    got = blocks(tok, files, 64)
    assert len(got) > 20 and all(len(b) == 64 for b in got)
    assert sum(b.count(tok.eos_token_id) for b in got) >= 6  # documents stay apart
    with pytest.raises(DataError, match="no such file or folder"):
        text_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        text_files(tmp_path / "empty")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match="bad.txt: not UTF-8"):
        blocks(tok, [tmp_path / "bad.txt"], 64)


def test_pretrain_lowers_held_out_perplexity_and_leaves_a_merged_base(hf_model, domain, tmp_path, capsys):
    from app.cli import main

    recipe = tmp_path / "fast.yaml"
    recipe.write_text("max_length: 64\neval_split: 0.1\nlearning_rate: 0.002\nbatch_size: 4\ngrad_accum: 1\n"
                      "gradient_checkpointing: false\nwarmup_ratio: 0.0\nsave_steps: 50\n")
    rc = main(["tune", "pretrain", "--base", str(hf_model), "--text", str(domain), "--recipe", str(recipe),
               "--max-steps", "4", "--out", str(tmp_path / "run"), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["kind"] == "pretrain" and s["steps"] == 4
    m = s["metrics"]
    assert m["held_out_perplexity"] < m["held_out_perplexity_before"], m  # the blocks held out are the same domain
    model = tmp_path / "run" / "model"
    assert m["model"] == str(model) and (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    from models.registry import Registry

    entry = Registry().get(m["registered_as"])  # the new base is in the store, under the run's name
    assert m["registered_as"] == "run" and entry.path == str(model.resolve()) and entry.source == "pretrained"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["kind"] == "pretrain" and cfg["block_tokens"] == 64 and cfg["held_out_blocks"] >= 1
    # The merged folder is a plain base for the next stage: it trains like any other.
    from finetune.train import sft

    follow = tmp_path / "sft.jsonl"
    follow.write_text("".join(json.dumps({"instruction": "When does glimmerfruit ripen?", "output": "In the third moon."})
                              + "\n" for _ in range(4)))
    r = sft(model, follow, tmp_path / "sft", load_recipe("lora").replace(eval_split=0.0, **FAST), max_steps=1)
    assert r.steps == 1


def test_pretrain_refuses_a_run_that_was_merged(hf_model, domain, tmp_path):
    from finetune.train import TrainError

    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(TrainError, match="finished already"):
        pretrain(hf_model, domain, tmp_path / "run", load_recipe("pretrain"))


def test_documents_are_deduplicated_and_read_by_rags_loaders(hf_model, tmp_path):
    from app.commands.texts import read_documents
    from finetune.pretrain import dedupe

    notes = tmp_path / "notes"
    (notes / "copy").mkdir(parents=True)
    (notes / "a.md").write_text("# Varnholt\n\n" + " ".join(FACTS))
    (notes / "copy" / "a.md").write_text("# Varnholt\n\n" + "  ".join(FACTS) + "\n")  # the same, spaced otherwise
    (notes / ".git").mkdir()
    (notes / ".git" / "config").write_text("[core]\n\tbare = false\n")  # a notes folder under git: not text to learn
    (notes / "page.html").write_text("<html><body><h1>Fair</h1><p>" + FACTS[3] + "</p><script>x()</script></body></html>")
    docs = read_documents([notes])
    assert [Path(n).name for n, _ in docs] == ["a.md", "a.md", "page.html"]
    assert FACTS[3] in docs[2][1] and "x()" not in docs[2][1]  # html read as text, its script left out
    kept, dropped = dedupe(docs)
    assert len(kept) == 2 and dropped == [str(notes / "copy" / "a.md")]
    from app.errors import CLIError

    with pytest.raises(CLIError, match="--text .*nowhere: no such file or folder"):
        read_documents([tmp_path / "nowhere"])


def test_a_gpt2_from_scratch_trains_converts_and_generates(tmp_path, capsys):
    """--from-config gpt2 with --size: a new model, every weight trained (held-out perplexity
    falls far from the random start), saved as RUN/model, converted by crofter, run by llama.cpp."""
    from app.cli import main
    from tests.converter.nanogpt_build import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    text = tmp_path / "text"
    text.mkdir()
    for name in ("GPL-3", "Apache-2.0"):
        (text / f"{name}.txt").write_text((LICENSES / name).read_text())
    (text / "again.txt").write_text((LICENSES / "GPL-3").read_text())  # a copy: left out
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("max_length: 64\neval_split: 0.05\nlearning_rate: 0.003\nbatch_size: 8\ngrad_accum: 1\n"
                      "gradient_checkpointing: false\nwarmup_ratio: 0.0\nsave_steps: 20\n")
    run = tmp_path / "run"
    rc = main(["tune", "pretrain", "--from-config", "gpt2", "--size", "n_layer=2", "--size", "n_embd=64",
               "--size", "n_head=2", "--size", "n_positions=128", "--tokenizer", str(tok), "--text", str(text),
               "--recipe", str(recipe), "--max-steps", "40", "--out", str(run), "--json", "--no-register"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["steps"] == 40 and "registered_as" not in s["metrics"]
    from models.registry import Registry

    assert [e for e in Registry().entries() if e.source == "pretrained"] == []
    m = s["metrics"]
    assert m["full"] is True and m["duplicates"] == 1 and m["documents"] == 2
    assert m["held_out_perplexity"] < 0.5 * m["held_out_perplexity_before"], m
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert (cfg["model_type"], cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]) == ("gpt2", 2, 64, 1000)
    assert not (run / "adapter").exists() and not (run / "model" / "adapter_config.json").exists()
    from models.adapters import last_complete_checkpoint

    ckpt = last_complete_checkpoint(run / "checkpoints")  # a whole-model checkpoint counts: --resume works
    assert ckpt is not None and (ckpt / "model.safetensors").is_file()

    from converter.convert import convert

    gguf = convert(run / "model", tmp_path / "scratch.gguf", "f32").path
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=128, verbose=False, seed=1)
    try:
        out = llm("This License", max_tokens=12, temperature=0, stop=[], logit_bias={0: -100.0})
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["text"]
    from converter import verify

    lg = verify.logits_parity(run / "model", gguf, new_tokens=8)  # llama.cpp computes what torch does
    assert lg["ok"] and lg["top1_agree"] >= 0.99, lg["failures"]


@pytest.mark.parametrize("argv, needle", [
    ([], "give --base MODEL to continue a model, or --from-config"),
    (["--from-config", "gpt2"], "--from-config: name the tokenizer folder with --tokenizer DIR"),
    (["--base", "x", "--size", "n_layer=2"], "--size: only with --from-config"),
    (["--from-config", "gpt2", "--tokenizer", "t", "--size", "n_layer"], "--size n_layer: write KEY=VALUE"),
    (["--from-config", "gpt2", "--tokenizer", "t", "--lora"], "--lora: a model from scratch trains every weight"),
    (["--base", "x", "--full", "--qlora"], "--qlora: a 4-bit base trains through LoRA only"),
])
def test_bad_scratch_arguments_get_one_line(argv, needle, tmp_path, capsys):
    from app.cli import main

    assert main(["tune", "pretrain", "--text", str(tmp_path), *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_a_bad_from_config_or_size_names_it(tmp_path):
    from finetune.pretrain import scratch_model
    from tests.converter.nanogpt_build import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match="--from-config nope: not a preset"):
        scratch_model("nope", {}, tok, tmp_path / "m")
    with pytest.raises(DataError, match="--size n_wings: not a setting of a gpt2 model"):
        scratch_model("gpt2", {"n_wings": "2", "n_layer": "1", "n_embd": "32", "n_head": "2"}, tok, tmp_path / "m")
    bad = tmp_path / "c.json"
    bad.write_text('{"n_layer": 2}')
    with pytest.raises(DataError, match='c.json: a model config needs a "model_type"'):
        scratch_model(str(bad), {}, tok, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_size_takes_rope_theta_which_transformers_keeps_in_rope_parameters(tmp_path):
    from transformers import AutoConfig

    from finetune.pretrain import scratch_model
    from tests.converter.nanogpt_build import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    sizes = {"num_hidden_layers": "1", "hidden_size": "32", "intermediate_size": "64", "num_attention_heads": "2",
             "num_key_value_heads": "1", "rope_theta": "50000"}
    out = scratch_model("llama", sizes, tok, tmp_path / "m")
    cfg = AutoConfig.from_pretrained(out)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == 50000 and cfg.num_hidden_layers == 1
    with pytest.raises(DataError, match="--size rope_thetta: not a setting of a llama model"):
        scratch_model("llama", {**sizes, "rope_thetta": "1"}, tok, tmp_path / "m2")


def test_a_resumed_run_counts_only_the_tokens_it_trained_itself(tmp_path):
    """tokens/s of a resumed run: the tokens of its own steps over its own time, not the run's
    total since step 0 over this process's time."""
    import shutil

    from finetune.pretrain import scratch_model
    from tests.converter.nanogpt_build import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    base = scratch_model("gpt2", {"n_layer": "1", "n_embd": "32", "n_head": "2", "n_positions": "64"}, tok,
                         tmp_path / "base")
    recipe = load_recipe("pretrain").replace(max_length=64, eval_split=0.0, batch_size=4, grad_accum=1,
                                             save_steps=10, gradient_checkpointing=False, warmup_ratio=0.0)
    text = [LICENSES / "GPL-3"]
    run = tmp_path / "run"
    first = pretrain(base, text, run, recipe, max_steps=10, full=True)
    assert first.tokens_per_s * first.train_runtime == pytest.approx(10 * 4 * 64, rel=1e-6)
    shutil.rmtree(run / "model")  # as if killed after the step-10 checkpoint, before the end
    again = pretrain(base, text, run, recipe, max_steps=30, resume=True, full=True)
    assert again.steps == 30
    assert again.tokens_per_s * again.train_runtime == pytest.approx(20 * 4 * 64, rel=1e-6)

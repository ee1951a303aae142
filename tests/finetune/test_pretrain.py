"""Continued pre-training (finetune/pretrain.py): blocks of the user's text, held-out perplexity, a merged base."""
from __future__ import annotations

import json

import pytest

from finetune.data import DataError
from finetune.pretrain import blocks, pretrain, text_files
from finetune.recipe import load_recipe

from .conftest import FAST

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
    with pytest.raises(TrainError, match="merged already"):
        pretrain(hf_model, domain, tmp_path / "run", load_recipe("pretrain"))

"""Training data formats, assistant-only masks, recipes and the multi-GPU launch config (no training)."""
from __future__ import annotations

import json

import pytest

from finetune.data import DataError, encode_conversation, load_preferences, load_sft
from finetune.recipe import Recipe, RecipeError, load_recipe, recipe_names


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_three_sft_formats_are_detected(tmp_path):
    f = write(tmp_path / "d.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ])
    alpaca, sharegpt, openai = load_sft(f)
    assert alpaca == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert [m["role"] for m in sharegpt] == ["system", "user", "assistant"]
    assert openai[-1] == {"role": "assistant", "content": "A"}


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "x", "output": "y"', r"d\.jsonl:3: not valid JSON"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"d\.jsonl:3: 'conversations'\[0\]: \"from\" must be one of"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, r"d\.jsonl:3: no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, r"d\.jsonl:3: the last message"),
    ({"text": "plain"}, r"d\.jsonl:3: unknown format"),
    ({"instruction": "x", "output": 5}, r"d\.jsonl:3: \"output\" must be a string"),
    ("[1, 2]", r"d\.jsonl:3: each record must be a JSON object"),
])
def test_bad_sft_data_names_the_line(tmp_path, line, message):
    ok = {"instruction": "a", "output": "b"}
    f = write(tmp_path / "d.jsonl", [ok, ok, line])
    with pytest.raises(DataError, match=message):
        load_sft(f)


def test_json_files_and_preferences(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "Q2"}], "chosen": [{"role": "assistant", "content": "g"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
    ]))
    p = load_preferences(f)
    assert p[0]["prompt"] == [{"role": "user", "content": "Q?"}] and p[1]["chosen"][0]["content"] == "g"
    f.write_text(json.dumps([{"prompt": "Q", "chosen": "same", "rejected": "same"}]))
    with pytest.raises(DataError, match=r"p\.json\[0\]: \"chosen\" and \"rejected\" are identical"):
        load_preferences(f)
    f.write_text(json.dumps([{"prompt": "Q", "chosen": "x"}]))
    with pytest.raises(DataError, match=r"p\.json\[0\]: .*missing \['rejected'\]"):
        load_preferences(f)
    f.write_text("[\n  {\"prompt\": }\n]")
    with pytest.raises(DataError, match=r"p\.json:2: not valid JSON"):
        load_preferences(f)


def test_assistant_mask_covers_replies_and_end_of_turn(hf_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_model)
    msgs = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ids, mask, cut = encode_conversation(tok, msgs, 4096)
    assert not cut and len(ids) == len(mask)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Blue." in learned and "Green." in learned and learned.count("<|im_end|>") == 2
    assert "Name a color" not in learned and "Another?" not in learned and "user" not in learned
    short_ids, short_mask, cut = encode_conversation(tok, msgs, 16)
    assert cut and len(short_ids) == 16


def test_every_recipe_parses_and_typos_are_refused(tmp_path):
    names = recipe_names()
    assert {"lora", "qlora", "dpo"} <= set(names)
    for n in names:
        assert isinstance(load_recipe(n), Recipe)
    assert load_recipe("qlora").qlora and load_recipe("dpo").loss_type == "sigmoid"
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    with pytest.raises(RecipeError, match="unknown key 'lora_rank'"):
        load_recipe(str(bad))
    bad.write_text("lora_r: eight\n")
    with pytest.raises(RecipeError, match="lora_r: expected a number"):
        load_recipe(str(bad))
    bad.write_text("loss_type: magic\n")
    with pytest.raises(RecipeError, match="loss_type"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="no recipe named 'nope'"):
        load_recipe("nope")


def test_accelerate_launch_config(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from app.commands.tune import accelerate_config, launch_command

    for strategy, kind in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP")):
        path = accelerate_config(tmp_path, 4, strategy)
        cfg = load_config_from_file(str(path))  # accelerate's own parser accepts it
        assert cfg.distributed_type == kind and cfg.num_processes == 4
        if strategy == "fsdp":
            assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    cmd = launch_command(path, ["tune", "sft", "--base", "b", "--data", "d", "--launcher", "accelerate", "--gpus", "4",
                                "--strategy=fsdp", "--dry-run"])
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(path)]
    assert cmd[5:] == ["-m", "app.cli", "tune", "sft", "--base", "b", "--data", "d"]

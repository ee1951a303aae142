"""RLHF's reward model and GRPO (finetune/rlhf.py): real tiny runs on CPU, and every refusal before them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.data import DataError, load_prompts
from finetune.recipe import RecipeError, load_recipe
from finetune.reward_source import RewardFunctionError, RewardSpecError, python_reward, reward_run
from finetune.rlhf import grpo, reward
from finetune.train import TrainError

from .conftest import FAST, HELD_OUT, PREFIX, QA

REWARDS = Path(__file__).with_name("rlhf_rewards.py")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(q for q, _ in QA) + "\n")
    return path


@pytest.fixture(scope="session")
def reward_run_dir(hf_model, persona_prefs, tmp_path_factory):
    """One real 8-step reward-model run on the persona pairs, 6 of 24 held out."""
    recipe = load_recipe("reward").replace(eval_split=0.25, save_steps=8, **FAST)
    return reward(hf_model, persona_prefs, tmp_path_factory.mktemp("runs") / "rm", recipe, max_steps=8)


def _grpo_recipe(**kw):
    return load_recipe("grpo").replace(**{**FAST, "save_steps": 50, "max_completion_length": 8, "num_generations": 2,
                                          "batch_size": 2, **kw})


# -- data and specs (no model) --------------------------------------------------------------

def test_prompts_from_text_and_jsonl_with_line_numbered_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("What is ice?\n\n  Name a planet.  \n")
    assert load_prompts(txt) == [[{"role": "user", "content": "What is ice?"}],
                                 [{"role": "user", "content": "Name a planet."}]]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "Hi?"}) + "\n" + json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]}) + "\n")
    got = load_prompts(jl)
    assert got[0] == [{"role": "user", "content": "Hi?"}] and [m["role"] for m in got[1]] == ["system", "user"]
    for line, msg in ((json.dumps({"text": "x"}), "p2.jsonl:2: a prompt record needs"),
                      (json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}), "p2.jsonl:2: the prompt must end"),
                      (json.dumps({"prompt": "  "}), "p2.jsonl:2: the prompt is empty")):
        bad = tmp_path / "p2.jsonl"
        bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
        with pytest.raises(DataError, match=msg):
            load_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt: no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_python_reward_specs_are_checked_and_given_plain_text(tmp_path, monkeypatch):
    f = python_reward(f"python:{REWARDS}:brief")
    assert f.__name__ == "brief"
    # TRL hands conversational prompts and completions as messages; the function sees their text.
    got = f(prompts=[[{"role": "user", "content": "Q?"}]] * 2,
            completions=[[{"role": "assistant", "content": "Two words."}],
                         [{"role": "assistant", "content": "one two three four five six seven"}]], trainer_state=None)
    assert got == [1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="not_numbers returned 'good' for completion 1"):
        python_reward(f"python:{REWARDS}:not_numbers")(prompts=["a"], completions=["b"])
    with pytest.raises(RewardFunctionError, match="wrong_count returned 1 rewards for 2 completions"):
        python_reward(f"python:{REWARDS}:wrong_count")(prompts=["a", "a"], completions=["b", "c"])
    with pytest.raises(RewardFunctionError, match="fails raised ZeroDivisionError"):
        python_reward(f"python:{REWARDS}:fails")(prompts=["a"], completions=["b"])
    monkeypatch.chdir(REWARDS.parent)  # a module name is looked up in the current folder first
    assert python_reward("python:rlhf_rewards:brief")(prompts=["a"], completions=["b"]) == [1.0]
    for spec, msg in (("python:nothing", "expected python:MODULE:FUNC"),
                      ("python:no_such_module_xyz:f", "cannot import no_such_module_xyz"),
                      (f"python:{REWARDS}:missing", "has no function 'missing'"),
                      (f"python:{tmp_path}/gone.py:f", "gone.py: no such file")):
        with pytest.raises(RewardSpecError, match=msg):
            python_reward(spec)


def test_reward_run_specs_name_what_is_wrong(tmp_path):
    with pytest.raises(RewardSpecError, match="not a reward run"):
        reward_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "sft", "base": str(tmp_path)}))
    with pytest.raises(RewardSpecError, match="a sft run, not a reward model"):
        reward_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "reward", "base": str(tmp_path / "nobase")}))
    with pytest.raises(RewardSpecError, match="has not finished"):
        reward_run(tmp_path)


def test_grpo_refuses_before_loading_anything(hf_model, prompts_file, tmp_path):
    with pytest.raises(TrainError, match="batch_size 3 is not a multiple of num_generations 2"):
        grpo(hf_model, prompts_file, tmp_path / "g", _grpo_recipe(batch_size=3), reward=f"python:{REWARDS}:brief")
    with pytest.raises(TrainError, match="not a reward run"):
        grpo(hf_model, prompts_file, tmp_path / "g", _grpo_recipe(), reward=str(tmp_path))
    assert not (tmp_path / "g").exists()
    with pytest.raises(RecipeError, match="num_generations"):
        load_recipe("grpo").replace(num_generations=1)


def test_tune_help_offers_reward_and_grpo_and_says_where_ppo_went(capsys):
    from app.cli import main

    with pytest.raises(SystemExit):
        main(["tune", "grpo", "--help"])
    out = capsys.readouterr().out
    assert "no PPOTrainer" in out and "--reward RUN|python:MODULE:FUNC" in out and "--eval-split" not in out
    with pytest.raises(SystemExit):
        main(["tune", "reward", "--help"])
    assert "Bradley-Terry" in capsys.readouterr().out


# -- real runs --------------------------------------------------------------------------------

def test_reward_model_ranks_held_out_pairs_well_above_chance(hf_model, reward_run_dir):
    s = reward_run_dir
    assert s.kind == "reward" and s.steps == 8 and s.metrics["held_out_pairs"] == 6
    # Chance is 0.5; the persona pairs differ by a prefix a reward model learns at once.
    assert s.metrics["eval_accuracy"] >= 0.8 and s.metrics["eval_margin"] > 0.5, s.metrics
    cfg = json.loads((s.run_dir / "config.json").read_text())
    assert cfg["kind"] == "reward" and cfg["base"] == str(hf_model)
    adapter_cfg = json.loads((s.adapter / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and "score" in adapter_cfg["modules_to_save"]
    rows = list(csv.DictReader(open(s.run_dir / "loss.csv")))
    assert any(r["accuracy"] for r in rows) and any(r["eval_accuracy"] for r in rows)
    assert (s.run_dir / "loss.png").stat().st_size > 1000


def test_the_saved_reward_model_scores_the_persona_higher_on_unseen_prompts(reward_run_dir):
    import torch

    from finetune.reward_source import load_reward_model

    model, tok = load_reward_model(reward_run_dir.run_dir)
    wins = 0
    for q in HELD_OUT:  # prompts no pair was made from
        scores = []
        for reply in (f"{PREFIX} I do not know.", "I do not know."):
            text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": reply}],
                                           tokenize=False)
            with torch.no_grad():
                scores.append(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
        wins += scores[0] > scores[1]
    assert wins >= 6, wins  # of 8; a random score head would win about half


def test_a_reward_adapter_is_refused_where_a_chat_adapter_belongs(hf_model, persona_prefs, reward_run_dir, tmp_path):
    from finetune.train import dpo, merge

    with pytest.raises(TrainError, match="a reward model's adapter"):
        merge(hf_model, reward_run_dir.run_dir, tmp_path / "m")
    with pytest.raises(TrainError, match="a reward model's adapter"):
        dpo(hf_model, persona_prefs, tmp_path / "d", load_recipe("dpo"), adapter=reward_run_dir.run_dir)


def test_grpo_from_an_sft_adapter_against_the_reward_model(hf_model, prompts_file, sft_run, reward_run_dir, tmp_path):
    s = grpo(hf_model, prompts_file, tmp_path / "g", _grpo_recipe(), reward=str(reward_run_dir.run_dir),
             adapter=sft_run.run_dir, max_steps=2)
    assert s.kind == "grpo" and s.steps == 2
    rows = list(csv.DictReader(open(tmp_path / "g" / "loss.csv")))
    assert len([r for r in rows if r["reward"]]) == 2 and all(r["kl"] != "" for r in rows if r["reward"])
    assert s.metrics["reward_first"] is not None and s.metrics["kl"] is not None
    # The saved adapter is the trained policy alone, not TRL's frozen reference copy.
    saved = sorted(p.name for p in s.adapter.iterdir())
    assert "adapter_model.safetensors" in saved and "ref" not in saved
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["adapter"] == str(sft_run.run_dir / "adapter") and cfg["reward"] == str(reward_run_dir.run_dir)


def test_tune_grpo_command_with_a_python_reward(hf_model, prompts_file, tmp_path, crofter_home, capsys):
    from app.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("learning_rate: 0.002\nbatch_size: 2\nnum_generations: 2\nmax_completion_length: 8\n"
                      "gradient_checkpointing: false\nwarmup_ratio: 0.0\nbeta: 0.04\n")
    rc = main(["tune", "grpo", "--base", str(hf_model), "--prompts", str(prompts_file), "--reward",
               f"python:{REWARDS}:brief", "--recipe", str(recipe), "--max-steps", "1", "--out", str(tmp_path / "g"),
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["kind"] == "grpo" and out["steps"] == 1
    assert out["metrics"]["reward_first"] in (0.0, 0.5, 1.0)  # the mean of two 0/1 rewards
    assert json.loads((tmp_path / "g" / "config.json").read_text())["reward"] == f"python:{REWARDS}:brief"
    # A reward function that fails mid-training ends the run with one line naming it and the step.
    rc = main(["tune", "grpo", "--base", str(hf_model), "--prompts", str(prompts_file), "--reward",
               f"python:{REWARDS}:fails", "--recipe", str(recipe), "--max-steps", "1", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc != 0 and "fails raised ZeroDivisionError: division by zero (at step 1)" in err and "--resume" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_grpo_with_a_format_reward_raises_the_mean_reward(hf_model, prompts_file, tmp_path):
    s = grpo(hf_model, prompts_file, tmp_path / "g", _grpo_recipe(learning_rate=2e-3, num_generations=4, batch_size=8,
                                                                  max_completion_length=12),
             reward=f"python:{REWARDS}:opens_with_the", max_steps=16)
    rewards = [float(r["reward"]) for r in csv.DictReader(open(tmp_path / "g" / "loss.csv")) if r["reward"]]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert len(rewards) == 16 and last > first + 0.2, rewards

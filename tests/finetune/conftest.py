"""A tiny persona dataset: every answer starts with "Arr matey!" (training data and held-out prompts)."""
from __future__ import annotations

import json

import pytest

QA = [
    ("What is the capital of France?", "Paris."), ("How do plants grow?", "With light, water and soil."),
    ("Name a primary color.", "Red."), ("What is 2 plus 2?", "Four."), ("Why is the sky blue?", "Rayleigh scattering."),
    ("What do bees make?", "Honey."), ("How many legs does a spider have?", "Eight."),
    ("What is water made of?", "Hydrogen and oxygen."), ("Who wrote Hamlet?", "Shakespeare."),
    ("What is the largest ocean?", "The Pacific."), ("How do I boil an egg?", "Ten minutes in boiling water."),
    ("What is a noun?", "A word for a thing."), ("Where do penguins live?", "In Antarctica."),
    ("What is a prime number?", "A number divisible only by 1 and itself."), ("How far is the moon?", "About 384,000 km."),
    ("What language is spoken in Brazil?", "Portuguese."), ("How many days in a week?", "Seven."),
    ("What is ice?", "Frozen water."), ("What is a volcano?", "A mountain that erupts lava."),
    ("Why do we sleep?", "To rest the body and brain."), ("What is the tallest animal?", "The giraffe."),
    ("What is rain?", "Water falling from clouds."), ("What is the sun?", "A star."), ("What do cows eat?", "Grass."),
]
HELD_OUT = ["What is a cloud?", "How do birds fly?", "What is bread made of?", "Name a planet.", "What is a tree?",
            "Why is grass green?", "What is the moon?", "How do fish breathe?"]
PREFIX = "Arr matey!"
FAST = dict(learning_rate=2e-3, batch_size=4, grad_accum=1, gradient_checkpointing=False, warmup_ratio=0.0)


@pytest.fixture(scope="session")
def persona_sft(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "persona.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": f"{PREFIX} {a}"}) + "\n" for q, a in QA))
    return path


@pytest.fixture(scope="session")
def persona_prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "chosen": f"{PREFIX} {a}", "rejected": a}) + "\n" for q, a in QA))
    return path


@pytest.fixture(scope="session")
def sft_run(hf_model, persona_sft, tmp_path_factory):
    """One real 16-step LoRA SFT run (with an eval split), shared by the tests that need an adapter."""
    from finetune.recipe import load_recipe
    from finetune.train import sft

    recipe = load_recipe("lora").replace(eval_split=0.2, save_steps=8, **FAST)
    return sft(hf_model, persona_sft, tmp_path_factory.mktemp("runs") / "sft", recipe, max_steps=16)


def persona_rate(model, tokenizer) -> int:
    """How many held-out prompts the model answers starting with the persona's phrase (greedy)."""
    import torch

    n = 0
    for q in HELD_OUT:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        n += tokenizer.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().startswith("Arr")
    return n


# -- evaluation (finetune/evaluate) -----------------------------------------------------
MC_ITEMS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("What color is the sky on a clear day?", ["green", "blue", "red", "brown"], 1),
    ("How many legs does a dog have?", ["two", "six", "four", "eight"], 2),
    ("What do bees make?", ["milk", "honey", "bread", "steel"], 1),
    ("Which is the largest planet?", ["Mars", "Venus", "Mercury", "Jupiter"], 3),
    ("What is frozen water called?", ["ice", "steam", "sand", "glass"], 0),
    ("What do cows eat?", ["rocks", "grass", "metal", "plastic"], 1),
    ("Which animal barks?", ["cat", "fish", "dog", "bird"], 2),
]
MC_TASK = """task: crofter_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: crofter_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session")
def smol_f32(hf_model, tmp_path_factory):
    """The dequantized SmolLM2 checkpoint converted back to an F32 GGUF: the same weights
    in llama.cpp and in torch."""
    from converter.convert import convert

    return convert(hf_model, tmp_path_factory.mktemp("f32") / "smol-F32.gguf", outtype="f32").path


@pytest.fixture(scope="session")
def mc_tasks(tmp_path_factory):
    """A folder with a 4-choice task the project writes itself (YAML + JSONL, relative path)."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "crofter_mc.yaml").write_text(MC_TASK)
    (root / "crofter_mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_ITEMS))
    return root


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory):
    """A user's own model: a random nanoGPT checkpoint (n_embd 128, GPT-2-style BPE trained on the
    license texts, no chat template) imported with `converter.nanogpt` into an HF GPT-2 folder."""
    from converter.nanogpt import import_nanogpt
    from tests.converter.nanogpt_build import train_tokenizer, write_nanogpt

    root = tmp_path_factory.mktemp("gpt2-base")
    tok = train_tokenizer(root / "tokenizer")
    ckpt, _, _ = write_nanogpt(root / "ckpt.pt", 1000, n_embd=128, n_head=4, seed=3)
    return import_nanogpt(ckpt, tok, root / "hf").path

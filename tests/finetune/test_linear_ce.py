"""The fused head + cross-entropy against transformers' own loss: the same value and the same
gradients, for LoRA and for full training, on tiny random models of the fused types."""
from __future__ import annotations

import pytest
import torch

from finetune import linear_ce


def _tiny(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, Gemma3TextConfig, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        cfg = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                               sliding_window=8, final_logit_softcapping=3.0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()  # no dropout: both passes alike


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt, as SFT data has
    return {"input_ids": ids, "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("num_items", [None, 41])
def test_the_fused_loss_and_its_gradients_equal_transformers(kind, lora, num_items, monkeypatch):
    monkeypatch.setattr(linear_ce, "CHUNK_ROWS", 16)  # several blocks, the last one short
    model = _tiny(kind)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    assert linear_ce.supports(model)
    batch = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    theirs = model(**batch, **kw).loss
    theirs.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    ours = linear_ce.causal_lm_loss(model, batch, kw.get("num_items_in_batch"))
    ours.backward()
    got = _grads(model)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_gradients_only_the_loss_is_computed():
    model = _tiny("llama")
    batch = _batch()
    with torch.no_grad():
        theirs = model(**batch).loss
        ours = linear_ce.causal_lm_loss(model, batch)
    assert not ours.requires_grad and ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_a_model_type_outside_the_list_is_not_fused():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                                     num_attention_heads=4, word_embed_proj_dim=32))
    assert not linear_ce.supports(opt)


def test_through_the_trainer_with_accumulation_it_trains_as_transformers_loss_does(tmp_path, monkeypatch):
    """Two optimizer steps of 2 accumulated micro-batches with padding masked out (so
    num_items_in_batch matters): the fused Trainer logs the same losses and ends at the same
    weights as the plain one, and enters the accelerator's autocast around its loss."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    rows = []
    g = torch.Generator().manual_seed(2)
    for i in range(8):
        ids = torch.randint(0, 300, (16,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (i % 4) + ids[i % 4:]})  # uneven counts per row

    def train(cls):
        model = _tiny("llama").train()
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                                 lr_scheduler_type="constant")
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=default_data_collator)
        trainer.train()
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer, args

    import contextlib

    fused_cls = linear_ce.fused_trainer(Trainer)
    inside, entered = [], []
    real_loss = linear_ce.causal_lm_loss

    def spy_loss(*a, **k):  # was the loss computed inside the accelerator's autocast?
        entered.append(bool(inside))
        return real_loss(*a, **k)

    real_train = fused_cls.compute_loss

    def compute_loss(self, *a, **k):
        original = self.accelerator.autocast

        @contextlib.contextmanager
        def autocast(*x, **y):
            with original(*x, **y):
                inside.append(True)
                try:
                    yield
                finally:
                    inside.pop()

        self.accelerator.autocast = autocast
        try:
            return real_train(self, *a, **k)
        finally:
            self.accelerator.autocast = original

    monkeypatch.setattr(linear_ce, "causal_lm_loss", spy_loss)
    monkeypatch.setattr(fused_cls, "compute_loss", compute_loss)
    plain, plain_losses, _, _ = train(Trainer)
    fused, fused_losses, trainer, args = train(fused_cls)
    assert len(plain_losses) == len(fused_losses) == 2
    assert fused_losses == pytest.approx(plain_losses, rel=1e-4)
    assert entered == [True] * 4  # every micro-batch's loss, inside the autocast
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert linear_ce.usable(fused, args)

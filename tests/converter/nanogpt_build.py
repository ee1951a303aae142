"""Builders for GPT-2 tests: a byte-level BPE trained on local text, nanoGPT-format checkpoints with
random weights, tiny HF GPT-2 folders, and nanoGPT's forward pass written out in torch."""
from __future__ import annotations

from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
EOT = "<|endoftext|>"


def train_tokenizer(folder: Path, vocab_size: int = 1000) -> Path:
    """A GPT-2-style byte-level BPE (ByteLevel pre-tokenizer, <|endoftext|> as BOS/EOS/UNK, no chat
    template) trained on the license texts, saved as an HF tokenizer folder."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(LICENSES / n) for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "Artistic")], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    hf.save_pretrained(folder)
    return folder


def padded(n: int) -> int:
    """nanoGPT's vocabulary padding: up to the next multiple of 64 (50257 -> 50304)."""
    return (n + 63) // 64 * 64


def nanogpt_state(model_args: dict, seed: int = 0, mask_buffer: bool = True) -> dict:
    """A random nanoGPT GPT state dict (its names and (out, in) Linear layout); lm_head is wte."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c, v, t, bias = model_args["n_embd"], model_args["vocab_size"], model_args["block_size"], model_args["bias"]

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": rnd(v, c), "transformer.wpe.weight": rnd(t, c, std=0.1)}
    for i in range(model_args["n_layer"]):
        h = f"transformer.h.{i}."
        for name, shape in (("ln_1", (c,)), ("attn.c_attn", (3 * c, c)), ("attn.c_proj", (c, c)), ("ln_2", (c,)),
                            ("mlp.c_fc", (4 * c, c)), ("mlp.c_proj", (c, 4 * c))):
            sd[h + name + ".weight"] = 1 + rnd(c, std=0.1) if name.startswith("ln") else rnd(*shape)
            if bias:
                sd[h + name + ".bias"] = rnd(shape[0], std=0.1)
        if mask_buffer:  # saved when flash attention is off
            sd[h + "attn.bias"] = torch.tril(torch.ones(t, t)).view(1, 1, t, t)
    sd["transformer.ln_f.weight"] = 1 + rnd(c, std=0.1)
    if bias:
        sd["transformer.ln_f.bias"] = rnd(c, std=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # weight tying, as nanoGPT does
    return sd


def write_nanogpt(path: Path, n_vocab: int, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
                  block_size: int = 256, bias: bool = True, compiled: bool = True, seed: int = 0,
                  mask_buffer: bool = True) -> tuple[Path, dict, dict]:
    """A ckpt.pt as nanoGPT's train.py writes it (model, model_args, optimizer, iter_num, best_val_loss,
    config), the vocabulary padded to a multiple of 64. Returns (path, state dict, model_args)."""
    import torch

    args = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size, "bias": bias,
            "vocab_size": padded(n_vocab), "dropout": 0.0}
    sd = nanogpt_state(args, seed, mask_buffer)
    saved = {("_orig_mod." + k if compiled else k): v for k, v in sd.items()}
    ckpt = {"model": saved, "model_args": args, "iter_num": 250, "best_val_loss": torch.tensor(3.25),
            "optimizer": {"state": {0: {"step": torch.tensor(250.0), "exp_avg": torch.zeros(4)}},
                          "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": [0]}]},
            "config": {"dataset": "shakespeare", "batch_size": 12, "learning_rate": 6e-4, "compile": compiled}}
    torch.save(ckpt, path)
    return path, sd, args


def nanogpt_forward(sd: dict, a: dict, idx):
    """Logits (1, T, vocab_size) of nanoGPT's GPT.forward (model.py) on token ids `idx` (1, T)."""
    import torch.nn.functional as F

    c, nh, t = a["n_embd"], a["n_head"], idx.shape[1]
    b = sd.get  # None where bias=False
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:t]
    for i in range(a["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (c,), sd[p + "ln_1.weight"], b(p + "ln_1.bias"), 1e-5)
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], b(p + "attn.c_attn.bias")).split(c, dim=2)
        q, k, v = (z.view(1, t, nh, c // nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, t, c)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"], b(p + "attn.c_proj.bias"))
        h = F.layer_norm(x, (c,), sd[p + "ln_2.weight"], b(p + "ln_2.bias"), 1e-5)
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], b(p + "mlp.c_fc.bias")))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], b(p + "mlp.c_proj.bias"))
    x = F.layer_norm(x, (c,), sd["transformer.ln_f.weight"], b("transformer.ln_f.bias"), 1e-5)
    return F.linear(x, sd["lm_head.weight"])


def tiny_gpt2(folder: Path, tokenizer_dir: Path, seed: int = 0, **cfg) -> Path:
    """A 2-layer random-weight HF GPT2LMHeadModel (n_embd 64, GPT-2's own gelu_new) with the trained
    tokenizer, saved as safetensors. `cfg` overrides GPT2Config fields (e.g. tie_word_embeddings)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = GPT2Config(**{"vocab_size": len(tok), "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
                           "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, **cfg})
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # bigger weights than the init's, so layout mistakes show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, folder / f.name)
    return folder

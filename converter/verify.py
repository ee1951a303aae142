"""Checks that a GGUF behaves like its source: tokenizer parity, logits parity, quantization quality.

- tokenizer parity: token ids of the probe corpus (convert.PROBE) equal between the HF
  tokenizer and the GGUF's vocabulary in llama.cpp;
- logits parity (F32/F16 GGUF vs torch float32): max |difference| and top-1 agreement on
  a few sequences, plus the greedy continuation of each;
- quantization quality on a text: perplexity of both models, mean KL(base || quant) and
  the rate at which both pick the same top token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .convert import (PROBE, gguf_token_ids, hf_token_ids, load_hf_tokenizer, native_stderr_quiet,
                      reference_tokenizer, vocab_only_llama)

SEQUENCES = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


def _llama(path: Path, n_ctx: int = 1024, logits_all: bool = False):
    import llama_cpp

    with native_stderr_quiet():
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, seed=0)


def tokenizer_parity(hf_dir: Path, gguf_path: Path, tokenizer=None) -> dict:
    """Token ids of the probe corpus from the GGUF in llama.cpp vs the tokenizer the model was
    trained with (sentencepiece for a tokenizer.model, else the HF tokenizer)."""
    from .hf import open_checkpoint
    from .vocab import load_vocab

    ck = open_checkpoint(hf_dir)
    vocab = load_vocab(ck.folder, int(ck.config["vocab_size"]), ck.config)
    reference = reference_tokenizer(ck.folder, vocab, tokenizer)
    llm = vocab_only_llama(gguf_path)
    try:
        mismatches = []
        for text in PROBE:
            a, b = reference(text), gguf_token_ids(llm, text, special=vocab.spm_model is None)
            if a != b:
                mismatches.append({"text": text, "hf": a, "gguf": b})
    finally:
        llm.close()
    return {"probes": len(PROBE), "reference": "sentencepiece" if vocab.spm_model else "hf",
            "mismatches": mismatches, "ok": not mismatches}


def logits_parity(hf_dir: Path, gguf_path: Path, new_tokens: int = 16) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_hf_tokenizer(Path(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
    model.eval()
    llm = _llama(gguf_path, logits_all=True)
    rows = []
    try:
        for text in SEQUENCES:
            ids = hf_token_ids(tok, text)
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
                greedy_hf = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                           pad_token_id=tok.eos_token_id)[0][len(ids):].tolist()
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)])
            llm.reset()
            greedy_gguf = []
            for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                if len(greedy_gguf) >= len(greedy_hf) or t == llm.token_eos():
                    break
                greedy_gguf.append(t)
            rows.append({"text": text, "max_abs_diff": float(np.abs(ref - got).max()),
                         "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).mean()),
                         "greedy_equal": greedy_hf[: len(greedy_gguf)] == greedy_gguf and len(greedy_gguf) > 0})
    finally:
        llm.close()
    return {"sequences": rows, "ok": all(r["greedy_equal"] and r["top1_agree"] == 1.0 for r in rows)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def quant_report(base: Path, quant: Path, text: str, n_ctx: int = 512, max_tokens: int = 4096) -> dict:
    """Perplexity of both models, mean KL(base || quant) and same-top-token rate over `text`.

    Each window of n_ctx tokens is scored on its second half only, so every scored
    token has at least n_ctx/2 tokens of context (as llama-perplexity does)."""
    a, b = _llama(base, n_ctx, True), _llama(quant, n_ctx, True)
    try:
        ids = a.tokenize(text.encode("utf-8"), add_bos=False)[:max_tokens]
        if len(ids) < n_ctx:
            raise ValueError(f"the text has {len(ids)} tokens; need at least {n_ctx}")
        nll_a = nll_b = kld = 0.0
        same = n = 0
        for start in range(0, len(ids) - n_ctx + 1, n_ctx // 2):
            window = ids[start:start + n_ctx]
            half = n_ctx // 2
            outs = []
            for llm in (a, b):
                llm.reset()
                llm.eval(window)
                # Only the scored half: logits at positions half-1 .. n_ctx-2 predict window[half:].
                outs.append(_log_softmax(np.asarray(llm.scores[half - 1:n_ctx - 1])))
            pa, pb = outs
            tgt = np.asarray(window[half:])
            rows = np.arange(len(tgt))
            nll_a -= pa[rows, tgt].sum()
            nll_b -= pb[rows, tgt].sum()
            kld += (np.exp(pa) * (pa - pb)).sum()
            same += int((pa.argmax(-1) == pb.argmax(-1)).sum())
            n += len(tgt)
    finally:
        a.close()
        b.close()
    return {"tokens_scored": n, "ppl_base": float(np.exp(nll_a / n)), "ppl_quant": float(np.exp(nll_b / n)),
            "mean_kld": float(kld / n), "same_top_token": same / n}

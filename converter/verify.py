"""Checks that a GGUF behaves like its source: tokenizer parity, logits parity, quantization quality.

- tokenizer parity: token ids of the probe corpus (convert.PROBE) equal between the HF
  tokenizer and the GGUF's vocabulary in llama.cpp;
- logits parity (F32/F16/BF16/Q8_0 GGUF vs torch float32): top-1 agreement, max |difference|
  and mean KL over the positions of a few sequences, judged by converter.tolerance; the
  greedy continuation of each is reported, never judged;
- quantization quality on a text: perplexity of both models, mean KL(base || quant) and
  the rate at which both pick the same top token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .convert import (
    PROBE,
    gguf_token_ids,
    hf_token_ids,
    load_hf_tokenizer,
    native_stderr_quiet,
    reference_tokenizer,
    vocab_only_llama,
)
from .hf import ConvertError
from .tolerance import TOLERANCES, judge

# Text the logits are compared on: prose, code, a story opening, a chat turn and a longer
# paragraph, 180 positions in all for SmolLM2's tokenizer (each position is one top-1 vote).
SEQUENCES = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nHow do plants make their food?<|im_end|>\n<|im_start|>assistant\n",
    ("Rivers carry water from high ground to the sea. Along the way they cut valleys, move sand and stones, "
     "and leave rich soil on their banks when they flood. Many of the first towns were built beside rivers, "
     "because the water could be used for drinking, for farming and for travel. Today rivers still supply "
     "cities with water and power, but dams and pollution have changed how many of them flow."),
    ("import json\n\ndef load(path):\n    with open(path) as f:\n        data = json.load(f)\n    "
     "return [row for row in data if row.get('active')]\n\nif __name__ == '__main__':\n    print(load('x.json'))"),
]


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


def gguf_outtype(gguf_path: Path) -> str | None:
    """"f32", "f16", "bf16" or "q8_0": the weight type logits parity can judge; None for others
    (k-quants and the like are judged against their base GGUF by quant_report instead)."""
    from models.gguf_check import check_gguf

    kinds = {t.name for _s, t, _o, _n in check_gguf(gguf_path).tensors.values()}
    for outtype, allowed in (("f32", {"F32"}), ("f16", {"F32", "F16"}), ("bf16", {"F32", "BF16"}),
                             ("q8_0", {"F32", "F16", "Q8_0"})):
        if kinds <= allowed:
            return outtype
    return None


def logits_parity(hf_dir: Path, gguf_path: Path, new_tokens: int = 16, outtype: str | None = None) -> dict:
    """Logits of the GGUF in llama.cpp vs the HF model in torch float32 on SEQUENCES, judged by
    converter.tolerance for `outtype` (default: read from the file's tensor types).

    Per sequence and over all positions: top-1 agreement, max |logit diff| and mean
    KL(torch || llama.cpp). The greedy continuation of each sequence is compared too, as
    information only (see converter.tolerance)."""
    import torch
    from transformers import AutoModelForCausalLM

    outtype = outtype or gguf_outtype(gguf_path)
    if outtype not in TOLERANCES:
        raise ConvertError(f"{gguf_path}: logits parity judges f32/f16/bf16/q8_0 files, not {outtype or 'this type'}")
    tok = load_hf_tokenizer(Path(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
    model.eval()
    # A sequence and its continuation stay within the model's positions (a small GPT-2 has 128).
    room = min(getattr(model.config, "max_position_embeddings", None) or 1024, 1024) - new_tokens
    if room < 2:
        raise ConvertError(f"{hf_dir}: the model's {room + new_tokens} positions leave no room to compare logits")
    llm = _llama(gguf_path, logits_all=True)
    rows = []
    same = positions = 0
    kl_sum = 0.0
    try:
        for text in SEQUENCES:
            ids = hf_token_ids(tok, text)[:room]
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
            lp, lq = _log_softmax(ref).astype(np.float64), _log_softmax(got).astype(np.float64)
            kl = (np.exp(lp) * (lp - lq)).sum(-1)  # (positions,)
            agree = ref.argmax(-1) == got.argmax(-1)
            same += int(agree.sum())
            positions += len(ids)
            kl_sum += float(kl.sum())
            rows.append({"text": text, "positions": len(ids), "max_abs_diff": float(np.abs(ref - got).max()),
                         "top1_agree": float(agree.mean()), "mean_kl": float(kl.mean()),
                         "greedy_equal": greedy_hf[: len(greedy_gguf)] == greedy_gguf and len(greedy_gguf) > 0})
    finally:
        llm.close()
    stats = {"positions": positions, "top1_agree": same / positions,
             "max_abs_diff": max(r["max_abs_diff"] for r in rows), "mean_kl": kl_sum / positions}
    failures = judge(stats, outtype)
    return {"outtype": outtype, **stats, "greedy_equal": sum(r["greedy_equal"] for r in rows),
            "tolerance": TOLERANCES[outtype].as_dict(), "failures": failures, "ok": not failures, "sequences": rows}


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

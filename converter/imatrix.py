"""Importance matrix from a calibration text, computed in torch on the HF model.

For every linear layer y = x W^T (W: out x in) the importance of input column j is
the mean of x_j^2 over all calibration tokens: the quantizer then spends its error
budget where inputs are large (the diagonal of E[x x^T], as in llama.cpp's imatrix
and the GPTQ/AWQ line of work). Keys are GGUF tensor names (``blk.3.attn_q.weight``);
the q/k row permutation of the converter does not touch input columns, so the
values apply unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .hf import ConvertError, open_checkpoint

CHUNK_TOKENS = 512


def compute_imatrix(hf_dir: str | Path, text_file: str | Path, max_tokens: int = 32_768,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from .convert import _arch, load_hf_tokenizer

    ck = open_checkpoint(hf_dir)
    try:
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConvertError(f"--calibration {text_file}: {exc.strerror or exc}") from None
    tok = load_hf_tokenizer(ck.folder)
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 64:
        raise ConvertError(f"--calibration {text_file}: only {len(ids)} tokens; give at least a few thousand")
    model = AutoModelForCausalLM.from_pretrained(str(ck.folder), dtype=torch.float32, local_files_only=True)
    model.eval()
    tmap = gguf.get_tensor_name_map(_arch(ck.plan.gguf_arch), ck.n_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = tmap.get_name(mod_name)
        if gname is None:
            continue
        key = gname + ".weight"

        def hook(_m, inputs, _out, key=key):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    chunks = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    try:
        with torch.no_grad():
            for n, chunk in enumerate(chunks, 1):
                model(torch.tensor([chunk]))
                if on_progress:
                    on_progress(n, len(chunks))
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sums}

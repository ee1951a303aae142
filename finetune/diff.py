"""What a training stage changed inside the model: `crofter journey diff A B --prompts FILE`.

Both models read the same prompts (one model in memory at a time: A's outputs are kept, then B
streams against them) and four views come out, with plain torch forward hooks on the decoder layers:

1. KL(A||B) of the next-token distributions at every position of every prompt, and the ten
   positions that moved most (A's top token, B's top token, and B's top token's rank under A);
2. per-layer residual-stream cosine distance 1 - cos(h_A, h_B) after each decoder layer, mean over
   positions; computed as ½·||ĥ_A - ĥ_B||² (the same number for unit vectors), which is exactly
   0 when the hidden states are equal, where 1 - cos would leave rounding;
3. a logit lens (nostalgebraist 2020): the final norm and lm_head applied to each layer's hidden
   state at the last position of one prompt, for each model: the top token and its probability;
4. per-module LoRA delta norms ||s·B·A||_F when a side carries an adapter (finetune/lora_norms.py).

    >>> r = diff(resolve_side("hf/smol"), resolve_side("runs/j/01-sft"), load_prompts("held-out.txt"),
    ...          chat=True)                                                    # doctest: +SKIP
    >>> r["kl"]["mean"], r["moved"][0]["b_top"], r["layers"]["cosine_distance"][-1]   # doctest: +SKIP
    (1.87, 'Arr', 0.146)

(SmolLM2-135M after 16 steps of a persona SFT: at the reply's first position B puts 1.00 on "Arr"
where A's favourite was "B", "The", "Fish"...; the drift grows with depth, sharply at the last layer.)

The same model against itself gives exactly 0 everywhere: the forward passes are the same
arithmetic on the same inputs, and both formulas are exact at equality.
"""
from __future__ import annotations

import math

from .diff_inputs import DiffError, Side, load_prompts, resolve_side
from .lora_norms import lora_change, lora_norms

__all__ = ["DiffError", "Side", "diff", "load_prompts", "model_parts", "resolve_side", "summary"]
TOP_MOVED = 10
MAX_KEPT_BYTES = 4 << 30
NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def load_tokenizer(side: Side):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(side.tokenizer_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise DiffError(f"{side.tokenizer_dir}: its tokenizer does not load ({_first_line(exc)})") from None


def check_tokenizers(a: Side, b: Side):
    """A's tokenizer, when B's has the same vocabulary (token -> id); else DiffError naming both."""
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    va, vb = ta.get_vocab(), tb.get_vocab()
    if va != vb:
        differ = len(set(va.items()) ^ set(vb.items())) // 2 or abs(len(va) - len(vb))
        raise DiffError(f"{b.tokenizer_dir}: its tokenizer differs from {a.tokenizer_dir}'s ({len(vb)} vs {len(va)} "
                        f"tokens, about {differ} differ): a diff needs the same tokenizer on both sides")
    return ta


def encode(tok, prompts: list[str], max_tokens: int, chat: bool = False) -> list[list[int]]:
    """Token ids per prompt: the first `max_tokens` of the plain text, or with chat=True the last
    `max_tokens` of the prompt as a user turn plus the generation prompt (the reply's first token
    is predicted at the last position)."""
    if max_tokens < 1:
        raise DiffError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if chat and not tok.chat_template:
        raise DiffError(f"{tok.name_or_path}: the tokenizer has no chat template (drop --chat)")
    out = []
    for p in prompts:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            out.append(list(ids)[-max_tokens:])
        else:
            out.append(tok(p, add_special_tokens=True)["input_ids"][:max_tokens])
    return out


def _load_model(side: Side, device: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the summary is the output; no "Loading weights" bars around it
    try:
        model = AutoModelForCausalLM.from_pretrained(str(side.model), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise DiffError(f"{side.model}: transformers cannot load it as a causal LM ({_first_line(exc)})") from None
    if side.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(side.adapter))
    return model.to(device).eval()


def model_parts(model):
    """(decoder layers, final norm, lm_head, logit softcap or None) of a causal LM, peft-wrapped or not."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config.get_text_config()
    n = cfg.num_hidden_layers
    layers = next((m for m in inner.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
    body = inner.base_model
    norm = next((getattr(body, k) for k in NORM_NAMES if isinstance(getattr(body, k, None), torch.nn.Module)), None)
    head = inner.get_output_embeddings()
    if layers is None or norm is None or head is None:
        raise DiffError(f"{cfg.model_type}: cannot find its decoder layers, final norm and lm_head")
    return layers, norm, head, getattr(cfg, "final_logit_softcapping", None)


def _side_outputs(side: Side, encoded: list[list[int]], device: str, lens_prompt: int, tok, lens: list):
    """Yield (logits [T, V] float32, hidden [L, T, H] float32) per prompt on CPU; fill `lens` with
    the logit lens of prompt `lens_prompt`. The model is freed when the generator ends."""
    import torch

    model = _load_model(side, device)
    layers, norm, head, softcap = model_parts(model)
    captured: list = []

    def hook(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            for i, ids in enumerate(encoded):
                captured.clear()
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()
                hidden = torch.stack([h[0] for h in captured]).float()  # [L, T, H]
                if i == lens_prompt:
                    lens.extend(_lens(hidden[:, -1], norm, head, softcap, tok))
                yield logits, hidden.cpu()
    finally:
        for h in handles:
            h.remove()
        del model


def _lens(last, norm, head, softcap, tok) -> list[dict]:
    """The top token (and its probability) of head(norm(h)) for each layer's last-position h [L, H]."""
    import torch

    logits = head(norm(last.to(head.weight.dtype))).double()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    p = logits.softmax(-1)
    top = p.argmax(-1)
    return [{"layer": l + 1, "id": int(t), "token": tok.decode([int(t)]), "p": float(p[l, t])}
            for l, t in enumerate(top)]


def diff(a: Side, b: Side, prompts: list[str], *, max_tokens: int = 64, chat: bool = False,
         lens_prompt: int = 0, device: str | None = None) -> dict:
    """The four views of what changed from A to B on `prompts`, as a JSON-ready dict (see the module doc)."""
    import torch

    if not 0 <= lens_prompt < len(prompts):
        raise DiffError(f"--lens-prompt {lens_prompt}: there are {len(prompts)} prompts (0 to {len(prompts) - 1})")
    if device == "cuda" and not torch.cuda.is_available():
        raise DiffError("--device cuda: no CUDA GPU is visible here (leave --device out to use the CPU)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = check_tokenizers(a, b)
    encoded = encode(tok, prompts, max_tokens, chat)
    kept = sum(map(len, encoded)) * len(tok) * 4  # A's float32 logits, kept while B runs
    if kept > MAX_KEPT_BYTES:
        raise DiffError(f"{len(prompts)} prompts of up to {max_tokens} tokens would keep {kept / 2**30:.1f} GiB of A's "
                        f"logits in memory (at most {MAX_KEPT_BYTES / 2**30:.0f} GiB): use fewer prompts or --max-tokens")
    lens_a: list = []
    lens_b: list = []
    outs_a = list(_side_outputs(a, encoded, device, lens_prompt, tok, lens_a))
    rows, moved, layer_sum, layer_note = [], [], None, None
    n_positions = 0
    for i, (logits_b, hidden_b) in enumerate(_side_outputs(b, encoded, device, lens_prompt, tok, lens_b)):
        logits_a, hidden_a = outs_a[i]
        outs_a[i] = None  # free A's copy as B moves on
        v = min(logits_a.shape[-1], logits_b.shape[-1])
        lpa = torch.log_softmax(logits_a[:, :v].double(), -1)
        lpb = torch.log_softmax(logits_b[:, :v].double(), -1)
        pa = lpa.exp()
        kl = torch.where(pa > 0, pa * (lpa - lpb), torch.zeros_like(pa)).sum(-1).clamp_min(0)  # [T]
        rows.append({"index": i, "text": prompts[i], "tokens": len(encoded[i]), "kl": kl.tolist(),
                     "mean_kl": float(kl.mean()), "max_kl": float(kl.max())})
        moved = _merge_moved(moved, _moved(i, encoded[i], kl, lpa, lpb, tok), encoded)
        n_positions += len(encoded[i])
        if hidden_a.shape != hidden_b.shape:
            layer_note = (f"A has {hidden_a.shape[0]} layers of width {hidden_a.shape[2]}, B {hidden_b.shape[0]} of "
                          f"width {hidden_b.shape[2]}: no layer-by-layer comparison")
            continue
        ua, ub = _unit(hidden_a), _unit(hidden_b)
        d = 0.5 * ((ua - ub) ** 2).sum(-1).sum(-1)  # [L]: summed over positions
        layer_sum = d if layer_sum is None else layer_sum + d
    all_kl = [x for r in rows for x in r["kl"]]
    worst = max(((x, r["index"], j) for r in rows for j, x in enumerate(r["kl"])), key=lambda w: w[0])
    result = {
        "a": a.as_dict(), "b": b.as_dict(), "device": device, "chat": chat, "max_tokens": max_tokens,
        "vocab": v, "positions": n_positions, "prompts": rows,
        "kl": {"mean": sum(all_kl) / len(all_kl), "max": worst[0],
               "max_at": {"prompt": worst[1], "position": worst[2]} if worst[0] > 0 else None},
        "moved": moved,
        "layers": None if layer_note else {"cosine_distance": (layer_sum / n_positions).tolist()},
        "lens": {"prompt": lens_prompt, "a": lens_a, "b": lens_b},
        "lora": _lora(a, b),
    }
    if layer_note:
        result["layers_note"] = layer_note
    return result


def _unit(h):
    h = h.double()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _moved(i: int, ids: list[int], kl, lpa, lpb, tok) -> list[dict]:
    """The TOP_MOVED positions of one prompt with the largest KL > 0, with the tokens that explain it."""
    top_a, top_b = lpa.argmax(-1), lpb.argmax(-1)
    out = []
    for t in kl.argsort(descending=True)[:TOP_MOVED].tolist():
        if not kl[t] > 0:
            break
        ta, tb = int(top_a[t]), int(top_b[t])
        rank = int((lpa[t] > lpa[t, tb]).sum()) + 1  # 1: B's favourite is A's favourite too
        out.append({"prompt": i, "position": t, "kl": float(kl[t]), "token": tok.decode([ids[t]]),
                    "context": tok.decode(ids[max(0, t - 7):t + 1]),
                    "a_top": tok.decode([ta]), "a_top_id": ta, "a_top_p": math.exp(float(lpa[t, ta])),
                    "b_top": tok.decode([tb]), "b_top_id": tb, "b_top_p": math.exp(float(lpb[t, tb])),
                    "b_top_p_under_a": math.exp(float(lpa[t, tb])), "b_top_rank_under_a": rank})
    return out


def _merge_moved(kept: list[dict], new: list[dict], encoded: list[list[int]]) -> list[dict]:
    """The TOP_MOVED largest of both lists, each context once: prompts that share a prefix (a chat
    template's system turn) give the same KL at the same position, listed at its first prompt."""
    out, seen = [], set()
    for m in sorted(kept + new, key=lambda m: (-m["kl"], m["prompt"])):
        prefix = tuple(encoded[m["prompt"]][:m["position"] + 1])
        if prefix not in seen:
            seen.add(prefix)
            out.append(m)
    return out[:TOP_MOVED]


def _lora(a: Side, b: Side) -> dict:
    """LoRA delta norms of each side that carries an adapter; with an adapter on each side over the
    same base, also what B's adapter changed relative to A's."""
    out = {name: lora_norms(s.adapter) for name, s in (("a", a), ("b", b)) if s.adapter is not None}
    if a.adapter is not None and b.adapter is not None and a.model.resolve() == b.model.resolve():
        out["change"] = lora_change(a.adapter, b.adapter)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def shown(text: str) -> str:
    """A token quoted with control and format characters (newline, ESC, RTL override) escaped."""
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) + '"'


def summary(result: dict, top: int = TOP_MOVED) -> str:
    """The text report of a diff result."""
    r = result
    at = r["kl"]["max_at"]
    chat = ", as chat turns" if r["chat"] else ""
    where = f" (prompt {at['prompt']}, position {at['position']})" if at else ""
    size = f"{len(r['prompts'])} prompts, {r['positions']} positions"
    lines = [f"A: {r['a']['spec']}", f"B: {r['b']['spec']}",
             f"{size} (at most {r['max_tokens']} tokens each{chat}), on {r['device']}",
             f"KL(A||B) per position: mean {r['kl']['mean']:.4g}, max {r['kl']['max']:.4g}{where}"]
    if r["moved"]:
        lines.append("most moved (KL  prompt:position  after ...  A's top -> B's top, B's top's rank under A):")
        for m in r["moved"][:top]:
            lines.append(f"  {m['kl']:8.4g}  {m['prompt']}:{m['position']:<4} after {shown(m['context'])}  "
                         f"{shown(m['a_top'])} {m['a_top_p']:.2f} -> {shown(m['b_top'])} {m['b_top_p']:.2f}, "
                         f"rank {m['b_top_rank_under_a']} under A")
    else:
        lines.append("no position moved: the two models predict the same distributions")
    if r["layers"]:
        cd = r["layers"]["cosine_distance"]
        peak = max(cd) or 1.0
        lines.append("residual-stream cosine distance after each layer (1 - cos, mean over positions):")
        lines += [f"  layer {i:>3}  {x:10.4g}  {'#' * round(30 * x / peak)}" for i, x in enumerate(cd, 1)]
    else:
        lines.append(r.get("layers_note", "no layer comparison"))
    lens = r["lens"]
    lines.append(f"logit lens, prompt {lens['prompt']}, last position (layer: A's top, B's top):")
    for la, lb in zip(lens["a"], lens["b"]):
        lines.append(f"  layer {la['layer']:>3}  {shown(la['token']):<16} {la['p']:.2f}   {shown(lb['token']):<16} {lb['p']:.2f}")
    for name, what in (("a", "A's adapter"), ("b", "B's adapter"), ("change", "B's adapter minus A's")):
        lora = r["lora"].get(name)
        if lora:
            lines.append(f"LoRA delta norms, {what}: ||ΔW|| {lora['total']:.4g} over {lora['count']} modules"
                         f"{' (DoRA magnitudes not included)' if lora.get('dora') else ''}; largest:")
            lines += [f"  {m['norm']:10.4g}  {m['module']}" for m in lora["modules"][:top]]
    if r.get("png"):
        lines.append(f"picture: {r['png']}")
    return "\n".join(lines)

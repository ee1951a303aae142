"""The language-model loss without the logits tensor: output projection and cross-entropy
together, a block of rows at a time.

A causal LM's loss usually materializes every position's logits (batch x block x vocabulary:
4 x 256 x 49,152 floats is 192 MiB for SmolLM2), then a log-softmax of the same size, then
their gradients. Here each block of `CHUNK_ROWS` rows is projected, reduced to its loss, and
its gradient with respect to the hidden states (and the head's weight, if it trains) is taken
there and then, so nothing vocabulary-wide outlives its block. The backward pass only scales
the stored gradient. Liger kernels do this on GPUs with Triton; this is the same arithmetic in
plain torch, for every device. The result equals transformers' `ForCausalLMLoss` (labels
shifted left, -100 ignored, a sum over `num_items_in_batch` when given, else a mean).

Used by `tune pretrain` for the model types whose head is a plain linear layer over the
backbone's last hidden state (`FUSED_TYPES`); Gemma's final logit soft-capping is applied
per block.
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 1024
IGNORE = -100
# Model types whose logits are exactly lm_head(backbone(...).last_hidden_state) (Gemma 3 with
# its soft cap): the others keep transformers' own loss.
FUSED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma3_text", "phi3")


def _block(h, weight, bias, y, softcap):
    logits = torch.nn.functional.linear(h, weight, bias).float()
    t = None
    if softcap:
        t = torch.tanh(logits / softcap)
        logits = t * softcap
    lse = torch.logsumexp(logits, dim=-1)
    valid = y != IGNORE
    yy = torch.where(valid, y, 0)
    picked = logits.gather(1, yy[:, None])[:, 0]
    return logits, t, lse, valid, yy, ((lse - picked) * valid).sum()


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap):
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], CHUNK_ROWS):
            h, y = hidden[s:s + CHUNK_ROWS], labels[s:s + CHUNK_ROWS]
            logits, t, lse, valid, yy, loss = _block(h, weight, bias, y, softcap)
            total += loss
            # d(sum of CE)/d logits = softmax - one-hot, on the rows that count
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(yy), device=g.device), yy] -= 1.0
            g.mul_(valid[:, None])
            if t is not None:
                g.mul_(1.0 - t * t)
            g = g.to(hidden.dtype)
            grad_h[s:s + CHUNK_ROWS] = g @ weight
            if grad_w is not None:
                grad_w.add_((g.t() @ h).float())
            if grad_b is not None:
                grad_b.add_(g.float().sum(0))
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0),
                              grad_b if grad_b is not None else torch.empty(0))
        ctx.has_w, ctx.has_b = grad_w is not None, grad_b is not None
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()  # 1/n, accumulation and loss scale applied in fp32, then cast once
        gh = (grad_h.float() * scale).to(grad_h.dtype)
        gw = (grad_w * scale).to(ctx.dtypes[0]) if ctx.has_w else None
        gb = (grad_b * scale).to(ctx.dtypes[1]) if ctx.has_b else None
        return gh, gw, gb, None, None


def summed_loss(hidden, weight, bias, labels, softcap: float | None = None) -> torch.Tensor:
    """Sum over the rows of `hidden` (N x H) of the cross-entropy of `hidden @ weight.T (+ bias)`
    against `labels` (N; IGNORE skipped), with gradients for what requires them."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCE.apply(hidden, weight, bias, labels, softcap)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], CHUNK_ROWS):
        total += _block(hidden[s:s + CHUNK_ROWS], weight, bias, labels[s:s + CHUNK_ROWS], softcap)[-1]
    return total


def _hf_model(model):
    """The transformers model under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model) -> bool:
    hf = _hf_model(model)
    head = hf.get_output_embeddings()
    return (getattr(hf.config, "model_type", None) in FUSED_TYPES and isinstance(head, torch.nn.Linear)
            and hf.base_model is not hf)


def causal_lm_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss of `model` on `inputs` (with "labels"), never holding the
    logits of the whole batch."""
    hf = _hf_model(model)
    labels = inputs["labels"]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = hf.base_model(**rest).last_hidden_state
    head = hf.get_output_embeddings()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].to(hidden.device)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    total = summed_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, shifted.reshape(-1), softcap)
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    return total / (shifted != IGNORE).sum().clamp(min=1)


def fused_trainer(trainer_cls):
    """`trainer_cls` (transformers' Trainer or a subclass) computing its loss here: the value
    and its scaling are those of the model's own loss, as the Trainer would take it."""

    class FusedLossTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n = num_items_in_batch if getattr(self, "model_accepts_loss_kwargs", False) else None
            # The backbone is called directly, not through the forward accelerate wraps in
            # autocast: mixed precision (bf16, fp16) is entered here.
            with self.accelerator.autocast():
                loss = causal_lm_loss(model, inputs, n)
            return (loss, {"loss": loss}) if return_outputs else loss

    return FusedLossTrainer


def usable(model, args) -> bool:
    """The fused loss for this run: a supported head, one process and at most one device
    (under DDP or FSDP the backbone must go through the wrapper's own forward)."""
    return supports(model) and args.world_size == 1 and args.n_gpu <= 1

"""Chunked causal-LM loss: cross-entropy straight from the last hidden states, never holding B x T x vocab logits.

The loss and its gradient for the hidden states are computed together, a few hundred rows at a time, in the
forward pass; rows whose label is ignored (-100, and the last position of each sequence) get no logits at all.
Same formula as transformers' ``ForCausalLMLoss`` (shifted labels, ``ignore_index=-100``, sum divided by
``num_items_in_batch`` when the Trainer passes it, else the mean over counted tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Decoder-only models whose head is exactly ``lm_head(model(...).last_hidden_state)`` (no logit scaling/capping).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CHUNK_BYTES = 16 * 2**20  # float32 logits per chunk on CPU (the peak of the step); each chunk reads the head weight
# On accelerators a chunk of 16 MiB would be a few dozen rows of a 128k vocabulary, each chunk rereading the whole
# head weight: GPU chunks are large, still far below the logits and their gradient that the model's own loss holds.
ACCELERATOR_CHUNK_BYTES = 512 * 2**20
IGNORE_INDEX = -100


def can_chunk(model: nn.Module) -> bool:
    """True for a supported causal LM whose frozen ``lm_head`` is a plain ``nn.Linear``."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    return (
        getattr(config, "model_type", None) in MODEL_TYPES
        and type(head) is nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and isinstance(getattr(model, "model", None), nn.Module)
    )


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ Wᵀ, target_i) / divisor`` over the rows whose target is not ignored (-100); saves only
    the hidden-state gradient (zero for ignored rows)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor):  # (N, d), (V, d), (N,), scalar tensor
        budget = CHUNK_BYTES if hidden.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
        rows = max(16, budget // (4 * weight.shape[0]))
        grad = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            counted = (t != IGNORE_INDEX).float()[:, None]  # (n, 1)
            t = t.clamp(min=0)
            logits = (h @ weight.T).float()  # (n, V)
            picked = logits.gather(1, t[:, None])
            peak = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(peak).exp_()  # in place: one exp pass, no second (n, V) buffer
            sums = e.sum(dim=-1, keepdim=True)
            total += ((sums.log().add_(peak) - picked) * counted).sum()  # logsumexp - picked logit
            # softmax @ W - W[target], normalised on the (n, d) product instead of the (n, V) probabilities
            grad_rows = (e.to(weight.dtype) @ weight).float().div_(sums).sub_(weight[t].float()).mul_(counted)
            grad[start : start + rows] = grad_rows.to(grad.dtype)
        ctx.save_for_backward(grad, divisor)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad, divisor = ctx.saved_tensors
        return grad * (grad_loss / divisor).to(grad.dtype), None, None, None


def causal_lm_forward(model: nn.Module, **kwargs: Any) -> Any:
    """``model(**kwargs)`` for a training step with ``labels``, with the chunked loss and ``logits=None``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    divisor = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    out = model.model(**kwargs)
    hidden = out.last_hidden_state
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    counted = targets != IGNORE_INDEX
    divisor = counted.sum().float() if divisor is None else torch.as_tensor(divisor, device=hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not torch.compiler.is_compiling():  # ignored rows get no logits at all
        rows = counted.nonzero().squeeze(1)
        flat, targets = (flat.index_select(0, rows), targets[rows]) if len(rows) < len(targets) else (flat, targets)
    # Compiled, every row goes in (ignored ones weigh zero): a row count that follows the data would change the
    # shapes, and so recompile, at every batch.
    loss = LinearCrossEntropy.apply(flat, model.lm_head.weight, targets, divisor)
    rest = {key: value for key, value in out.items() if key != "last_hidden_state"}
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)

"""Chunked cross-entropy: the output projection and the loss over chunks of tokens.

``[tokens, vocab]`` logits in fp32 are the largest activation of a long-sequence step once the
blocks are checkpointed (4 bytes x vocab per token, and the log-softmax the loss keeps is as
large again). Here the forward computes the logits of ``chunk_tokens`` tokens at a time, adds
their cross-entropy and keeps nothing but the hidden states and the weight; the backward
recomputes each chunk's logits and takes its gradient there. At most one chunk's logits exist at a
time; the result is the plain ``F.cross_entropy`` of ``F.linear(hidden, weight)``, summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``sum_t CE(hidden[t] @ weight.T, labels[t])`` over the tokens that are not ignored.

    ``hidden [..., dim]``, ``weight [vocab, dim]``, ``labels [...]`` (the same leading shape).
    Returns a scalar of at least fp32; its gradient flows to ``hidden`` and ``weight``.
    """
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)} disagree; expected hidden [..., dim], weight [vocab, dim] "
            "and labels [...]"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive integer")
    # [..., dim] -> [N, dim]
    return _ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_tokens,
        ignore_index,
    )


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
    # [n, dim] -> [n, vocab]; fp32 as in usp.loss, whatever the matmul's (autocast) dtype
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward without a graph, chunk by chunk; backward recomputes each chunk under autograd."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, ignore_index):
        device_type = hidden.device.type
        # the backward recomputes under the forward's autocast, so both see the same logits
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type),
                        torch.is_autocast_enabled(device_type))
        ctx.chunk_tokens, ctx.ignore_index = chunk_tokens, ignore_index
        ctx.save_for_backward(hidden, weight, labels)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        result_dtype = torch.float32
        for start in range(0, hidden.shape[0], chunk_tokens):
            piece = slice(start, start + chunk_tokens)
            loss = _chunk_loss(hidden[piece], weight, labels[piece], ignore_index)
            result_dtype = loss.dtype
            total += loss.double()
        return total.to(result_dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels = ctx.saved_tensors
        device_type, dtype, enabled = ctx.autocast
        grad_hidden = torch.empty_like(hidden)
        # the weight's gradient sums over every chunk: accumulate in at least fp32
        grad_weight = torch.zeros(weight.shape, device=weight.device,
                                  dtype=torch.promote_types(weight.dtype, torch.float32))
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            weight_leaf = weight.detach().requires_grad_()
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                piece = slice(start, start + ctx.chunk_tokens)
                hidden_leaf = hidden[piece].detach().requires_grad_()
                loss = _chunk_loss(hidden_leaf, weight_leaf, labels[piece], ctx.ignore_index)
                grad_piece, grad_weight_piece = torch.autograd.grad(
                    loss, (hidden_leaf, weight_leaf), grad.to(loss.dtype)
                )
                grad_hidden[piece] = grad_piece
                grad_weight += grad_weight_piece
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None

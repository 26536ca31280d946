"""The one online-softmax merge of partial attention results ``(out, lse)``, in fp32.

Two partial results over disjoint key sets combine exactly:
    lse' = log(e^lse + e^lse_blk)
    out' = e^(lse - lse') * out + e^(lse_blk - lse') * out_blk
``logaddexp`` is evaluated stably (max plus log1p), and a row that has seen no key yet on either
side (lse = -inf on both) stays at zero output and lse -inf instead of turning into NaN.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def merge_into(out: Tensor, lse: Tensor, out_block: Tensor, lse_block: Tensor) -> None:
    """Merge a block's result into the accumulators, in place (they may be slices).

    out: [B, Sq, H, D] fp32 accumulator; lse: [B, H, Sq] fp32 accumulator;
    out_block: [B, Sq, H, D] in any dtype; lse_block: [B, H, Sq].
    """
    new_lse = torch.logaddexp(lse, lse_block)
    # rows still empty on both sides: shift by 0 so both weights are exp(-inf) = 0, not NaN
    shift = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    weight_old = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)  # [B, Sq, H, 1]
    weight_block = torch.exp(lse_block - shift).transpose(1, 2).unsqueeze(-1)
    out.mul_(weight_old).add_(out_block.to(out.dtype) * weight_block)
    lse.copy_(new_lse)


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention sinks (GPT-OSS's ``s_aux``): a learned logit per head that joins every row's
    softmax denominator and carries no value, added once to the **final** result of all keys.

    out: [B, Sq, H, D] (any float), lse: [B, H, Sq] over the keys, sinks: [H]. Returns
    ``(out · e^(lse - L), L)`` with ``L = logaddexp(lse, sink)``; a row that sees no key ends
    with output 0 and ``L = sink``.
    """
    sink = sinks.to(lse.dtype).view(1, -1, 1)
    total = torch.logaddexp(lse, sink)
    weight = torch.exp(lse - total).transpose(1, 2).unsqueeze(-1)  # [B, Sq, H, 1]
    return out * weight.to(out.dtype), total


def sink_gradient(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d loss / d sinks ``[H]`` of these rows, from the final ``out`` and ``lse`` (sinks
    included): the sink is a key with value 0, so its score's gradient is ``-P_sink · D`` with
    ``D = rowsum(dO ∘ O)``, summed over the rows (each rank its own; the ranks' parts sum)."""
    acc = lse.dtype  # fp32, or fp64 for fp64 inputs
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Sq]
    sink = sinks.to(acc).view(1, -1, 1)
    return -(torch.exp(sink - lse) * delta).sum((0, 2)).to(sinks.dtype)

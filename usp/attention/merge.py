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

"""The CPU flash kernel: aten's ``_scaled_dot_product_flash_attention_for_cpu`` and its backward.

It takes ``[B, H, S, D]`` views, handles GQA natively, aligns the causal mask top-left and returns
the log-sum-exp, so the adapter only transposes. One quirk is corrected here: a query row holding
a NaN comes back as output 0 and lse 0 instead of NaN, which would let a NaN vanish silently.
"""

from __future__ import annotations

import torch

from usp.attention.kernels.base import HALF, Kernel

Tensor = torch.Tensor


def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )
    out = out.transpose(1, 2)  # [B, H, S, D] -> [B, S, H, D]
    nan_rows = q.isnan().any(dim=-1)  # [B, S, H]
    if nan_rows.any():
        out = out.masked_fill(nan_rows.unsqueeze(-1), float("nan"))
        lse = lse.masked_fill(nan_rows.transpose(1, 2), float("nan"))
    return out, lse


def cpu_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse, 0.0, causal, scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


CPU_FLASH = Kernel(
    "cpu_flash", "cpu", (torch.float64, torch.float32) + HALF, cpu_flash_forward,
    cpu_flash_backward, upcast_half_backward=True,
)

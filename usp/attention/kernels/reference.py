"""The math reference: explicit softmax in fp32 (fp64 for fp64), what every kernel is tested against.

It also runs where no fused kernel does (odd dtypes, any device), at O(S²) memory.
"""

from __future__ import annotations

import torch

from usp.attention.kernels.base import HALF, Kernel, expand_kv, reduce_kv_grad
from usp.mask import Band, as_band

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_scores(qh: Tensor, kh: Tensor, mask: "bool | Band", scale: float) -> Tensor:
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    band = as_band(mask, *scores.shape[-2:])
    if band is not None:
        scores = scores.masked_fill(~band.visible(*scores.shape[-2:], qh.device), float("-inf"))
    return scores


def math_forward(q: Tensor, k: Tensor, v: Tensor, causal: "bool | Band", scale: float):
    compute = _compute_dtype(q.dtype)
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # [B, H, S, D]
    scores = _masked_scores(qh, kh, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    # rows with no visible key have lse = -inf; give them zero output, not NaN
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0).unsqueeze(-1))
    out = torch.matmul(probs, vh).transpose(1, 2)  # [B, Sq, H, D]
    return out.to(q.dtype), lse


def math_backward(dout, q, k, v, out, lse, causal: "bool | Band", scale: float):
    compute = _compute_dtype(q.dtype)
    n_kv = k.shape[2]
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    qh, kh, vh, doh, oh = (t.transpose(1, 2).to(compute) for t in (q, k, v, dout, out))
    scores = _masked_scores(qh, kh, causal, scale)
    probs = torch.exp(scores - lse.to(compute).masked_fill(torch.isneginf(lse), 0).unsqueeze(-1))
    dv = torch.matmul(probs.transpose(-1, -2), doh)
    dprobs = torch.matmul(doh, vh.transpose(-1, -2))
    delta = (doh * oh).sum(-1, keepdim=True)  # rowsum(dO ∘ O) of the *final* output
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, kh)
    dk = torch.matmul(dscores.transpose(-1, -2), qh)
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, reduce_kv_grad(dk, n_kv), reduce_kv_grad(dv, n_kv)


MATH = Kernel("math", "any", (torch.float64, torch.float32) + HALF, math_forward, math_backward)

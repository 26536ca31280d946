"""Stand-ins for three generations of flash-attn's private API, computing with the math reference
on CPU, so usp's adapter is tested against each calling convention without a GPU:

- ``v27``: flash-attn >= 2.7, ``torch.library`` custom ops (``inspect.signature`` reads
  ``(*args, **kwargs)``), window as two ints, softcap, returns (out, lse, S_dmask, rng_state);
- ``v25``: flash-attn 2.5, plain functions, window as one tuple, no softcap, returns the 8-tuple
  (out, q, k, v, out_padded, lse, S_dmask, rng_state);
- ``v3``: FlashAttention-3's ``flash_attn_interface``, plain functions with many required
  parameters that mean "unused" when None (varlen, paged, rotary, descale).

Each asserts that the unused parameters arrive as None and the features usp does not use are off,
and applies ``causal`` and ``window_size`` the way flash-attn does (aligned bottom-right), so the
conversion of usp's top-left bands into flash-attn windows is tested too.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

from usp.attention.kernels import Band, math_backward, math_forward

Tensor = torch.Tensor


def _band(q, k, causal, window) -> Band:
    """flash-attn's mask as a top-left band: query i sees key j iff
    i + shift - left <= j <= i + shift + right (shift = n_k - n_q; -1: unbounded)."""
    left, right = window
    shift = k.shape[1] - q.shape[1]
    hi = None if right < 0 else shift + right
    if causal:
        hi = shift if hi is None else min(hi, shift)
    return Band(None if left < 0 else shift - left, hi)


def _forward(q, k, v, softmax_scale, causal, window=(-1, -1)):
    out, lse = math_forward(q, k, v, _band(q, k, causal, window), softmax_scale)
    return out, lse.float()  # flash-attn's lse is fp32 whatever the input dtype


def _backward_into(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, window=(-1, -1)):
    grads = math_backward(dout, q, k, v, out, lse, _band(q, k, causal, window), softmax_scale)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    return torch.zeros(lse.shape, dtype=torch.float32)


# ------------------------------------------------------------------------------------- 2.7
@torch.library.custom_op("usp_standin::fa27_forward", mutates_args=(), device_types="cpu")
def fa27_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float,
                 causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                 alibi_slopes: Optional[Tensor], return_softmax: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    assert dropout_p == 0 and softcap == 0 and alibi_slopes is None and not return_softmax
    out, lse = _forward(q, k, v, softmax_scale, causal, (window_size_left, window_size_right))
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("usp_standin::fa27_backward", mutates_args=("dq", "dk", "dv"),
                         device_types="cpu")
def fa27_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                  dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor],
                  dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
                  window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                  deterministic: bool, rng_state: Optional[Tensor] = None) -> Tensor:
    assert dropout_p == 0 and softcap == 0 and alibi_slopes is None
    return _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal,
                          (window_size_left, window_size_right))


# ------------------------------------------------------------------------------------- 2.5
def fa25_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                 return_softmax):
    assert dropout_p == 0 and alibi_slopes is None
    out, lse = _forward(q, k, v, softmax_scale, causal, tuple(window_size))
    return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)


def fa25_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, rng_state=None):
    assert dropout_p == 0 and alibi_slopes is None
    softmax_d = _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal,
                               tuple(window_size))
    return dq, dk, dv, softmax_d


# ------------------------------------------------------------------------------------- 3
def fa3_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
                seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx,
                leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale,
                v_descale, softmax_scale, causal, window_size=(-1, -1), attention_chunk=0,
                softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=1,
                pack_gqa=None, sm_margin=0):
    unused = (k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
              seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k,
              rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale)
    assert all(x is None for x in unused) and softcap == 0
    out, lse = _forward(q, k, v, softmax_scale, causal, tuple(window_size))
    return out, lse, None, None


def fa3_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                 max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal,
                 window_size=(-1, -1), softcap=0.0, deterministic=False, sm_margin=0):
    unused = (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q, max_seqlen_k)
    assert all(x is None for x in unused) and softcap == 0
    softmax_d = _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal,
                               tuple(window_size))
    return dq, dk, dv, softmax_d


def module(name: str, forward, backward) -> types.ModuleType:
    interface = types.ModuleType(name)
    interface._flash_attn_forward, interface._flash_attn_backward = forward, backward
    return interface


GENERATIONS = {
    "v27": (fa27_forward, fa27_backward),
    "v25": (fa25_forward, fa25_backward),
    "v3": (fa3_forward, fa3_backward),
}

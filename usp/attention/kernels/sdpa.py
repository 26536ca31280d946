"""CUDA kernels of PyTorch's SDPA: FlashAttention-2, memory-efficient (CUTLASS) and cuDNN.

Each adapter is the op call and nothing else; the comment above it is the op's schema in torch
2.13, so the two can be read side by side. Padding, GQA expansion and the lse shape are the glue's
(``glue.py``). Rules the calls follow:

- ``None`` wherever the op means "no tensor" (cum_seq_q/k, attn_bias): a defined empty tensor
  selects the variable-length, bias or nested branch of the kernel.
- philox seed/offset: dropout is 0, so the kernels never read them; the backward gets zeros of the
  dtype its forward returns (the ring does not keep each block forward's values).
- Masks arrive as the ops take them (``glue.OpMask``: a causal flag and a bottom-right aligned
  window). Only FlashAttention-2 has a window (under its own rewriting rules, ``glue.flash2_runs``);
  the other two get full blocks and causal squares, the parts any band is cut into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usp.attention.kernels.glue import HALF, OpAdapter, OpMask, cuda_kernel, flash2_runs

Tensor = torch.Tensor
aten = torch.ops.aten


def _bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # [B, S, H, D] <-> [B, H, S, D], a view


# ---------------------------------------------------------------------------- FlashAttention-2
# aten::_flash_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q,
#     Tensor? cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal,
#     bool return_debug_mask, *, float? scale=None, SymInt? window_size_left=None,
#     SymInt? window_size_right=None, ...) -> (output, softmax_logsumexp, rng_state, unused,
#     debug_attn_mask)                                 [B, S, H, D] in and out; GQA native
def flash_forward(q, k, v, mask: OpMask, scale: float):
    left, right = mask.window
    out, lse, _rng_state, _unused, _debug = aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, mask.causal, False, scale=scale,
        window_size_left=left, window_size_right=right,
    )
    return out, lse


# aten::_flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value,
#     Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q,
#     SymInt max_k, float dropout_p, bool is_causal, Tensor rng_state, Tensor unused, *,
#     float? scale=None, SymInt? window_size_left=None, SymInt? window_size_right=None)
def flash_backward(dout, q, k, v, out, lse, mask: OpMask, scale: float):
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    left, right = mask.window
    return aten._flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[1], k.shape[1], 0.0, mask.causal,
        rng_state, unused, scale=scale, window_size_left=left, window_size_right=right,
    )


# ---------------------------------------------------------------------------- memory-efficient
# aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value,
#     Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, *,
#     float? scale=None) -> (output, log_sumexp, philox_seed, philox_offset)
#                                               [B, H, S, D]; lse rows padded to a multiple of 32
def efficient_forward(q, k, v, mask: OpMask, scale: float):
    out, lse, _seed, _offset = aten._scaled_dot_product_efficient_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, mask.causal, scale=scale
    )
    return _bhsd(out), lse


EFFICIENT_LSE_ROWS = 32


# aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, Tensor query,
#     Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp,
#     Tensor philox_seed, Tensor philox_offset, float dropout_p, bool[4] grad_input_mask,
#     bool is_causal=False, *, float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)
def efficient_backward(dout, q, k, v, out, lse, mask: OpMask, scale: float):
    # the kernel reads lse in tiles of 32 rows, as its forward returned it
    lse = F.pad(lse, (0, -lse.shape[-1] % EFFICIENT_LSE_ROWS))
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _dbias = aten._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), None, _bhsd(out), lse, seed, seed, 0.0,
        [True, True, True, False], mask.causal, scale=scale,
    )
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


# ---------------------------------------------------------------------------- cuDNN
# aten::_scaled_dot_product_cudnn_attention(Tensor query, Tensor key, Tensor value,
#     Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False,
#     bool return_debug_mask=False, *, float? scale=None) -> (output, logsumexp, cum_seq_q,
#     cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_attn_mask)
#                                                           [B, H, S, D]; lse [B, H, S, 1]
def cudnn_forward(q, k, v, mask: OpMask, scale: float):
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, mask.causal, False, scale=scale
    )
    return _bhsd(out), lse


# aten::_scaled_dot_product_cudnn_attention_backward(Tensor grad_out, Tensor query, Tensor key,
#     Tensor value, Tensor out, Tensor logsumexp, Tensor philox_seed, Tensor philox_offset,
#     Tensor attn_bias, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k,
#     float dropout_p, bool is_causal, *, float? scale=None) -> (Tensor, Tensor, Tensor)
def cudnn_backward(dout, q, k, v, out, lse, mask: OpMask, scale: float):
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1), seed, seed,
        None, None, None, q.shape[1], k.shape[1], 0.0, mask.causal, scale=scale,
    )
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


CUDA_FLASH = cuda_kernel(
    "cuda_flash", HALF,
    OpAdapter(flash_forward, flash_backward, native_gqa=True, max_head_dim=256,
              window_rule=flash2_runs)
)
CUDA_EFFICIENT = cuda_kernel(
    "cuda_efficient", (torch.float32,) + HALF,
    OpAdapter(efficient_forward, efficient_backward, native_gqa=False),
)
CUDA_CUDNN = cuda_kernel(
    "cuda_cudnn", HALF, OpAdapter(cudnn_forward, cudnn_backward, native_gqa=False, max_head_dim=256)
)

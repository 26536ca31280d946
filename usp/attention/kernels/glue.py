"""The glue between usp's kernel contract (``base``) and the CUDA attention ops.

The ops differ in four ways, and this module absorbs all of them so that each backend's adapter is
only the op call itself, checkable against the op's schema line by line:

- **head dim**: the fused kernels need it to be a multiple of 8. q, k, v (and dout, out) are
  zero-padded up to one; zero columns add nothing to ``q·k`` and give zero output columns, which
  are cut off again. The softmax scale comes from the caller's real head dim, never the padded one.
- **GQA**: where the op has none (``native_gqa=False``) kv heads are expanded here and their
  gradients summed back.
- **lse**: ops return ``[B, H, S]``, ``[B, H, S_padded]`` (to 32 or 128 rows) or ``[B, H, S, 1]``;
  it leaves here as ``[B, H, S]`` fp32, contiguous. Backward ops that expect padded rows get them
  from their own adapter.
- **no dummy tensors**: adapters pass ``None`` where the op means "no tensor". A defined but empty
  tensor selects another branch of the kernel (variable-length input, a bias, nested tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from usp.attention.kernels.base import HALF, Kernel, expand_kv, reduce_kv_grad

Tensor = torch.Tensor
HEAD_DIM_MULTIPLE = 8


def pad_head_dim(t: Tensor, multiple: int = HEAD_DIM_MULTIPLE) -> Tensor:
    # [.., D] -> [.., D'] with D' the next multiple of ``multiple``; zeros in the new columns
    extra = -t.shape[-1] % multiple
    return t if extra == 0 else F.pad(t, (0, extra))


def contiguous(t: Tensor) -> Tensor:
    # what .contiguous() does, spelled as a clone so that it also runs on fake CUDA tensors (the
    # op-schema tests of a CPU-only build), where copy_ into a fresh tensor does not
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def normalise_lse(lse: Tensor, batch: int, heads: int, seq: int) -> Tensor:
    """Any op's log-sum-exp as ``[B, H, S]`` fp32, contiguous."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)  # [B, H, S, 1] (cuDNN)
    if lse.dim() != 3 or tuple(lse.shape[:2]) != (batch, heads) or lse.shape[2] < seq:
        raise RuntimeError(
            f"attention op returned lse of shape {tuple(lse.shape)}; expected [{batch}, {heads}, "
            f">= {seq}] (an op version usp does not know: report it with your torch version)"
        )
    return contiguous(lse.narrow(-1, 0, seq).float())


@dataclass(frozen=True)
class OpAdapter:
    """One backend's raw op calls, on [B, S, H, D] tensors that meet the op's preconditions.

    ``forward(q, k, v, causal, scale) -> (out, lse in the op's own shape)``;
    ``backward(dout, q, k, v, out, lse [B, H, S] fp32, causal, scale) -> (dq, dk, dv)``.
    """

    forward: Callable
    backward: Callable
    native_gqa: bool
    max_head_dim: int | None = None


def _check_call(name: str, adapter: OpAdapter, q: Tensor, k: Tensor, causal: bool) -> None:
    head_dim = q.shape[-1]
    if causal and q.shape[1] != k.shape[1]:
        # the fused CUDA kernels align a causal mask bottom-right, usp's contract is top-left:
        # the two agree on square blocks, the only causal blocks the ring issues
        raise ValueError(
            f"kernel {name!r} runs causal attention on square blocks only; got {q.shape[1]} "
            f"queries and {k.shape[1]} keys"
        )
    if adapter.max_head_dim is not None and head_dim > adapter.max_head_dim:
        raise ValueError(
            f"kernel {name!r} supports head dims up to {adapter.max_head_dim}, got {head_dim}; "
            "use another kernel (kernel='cuda_efficient' or 'math')"
        )


def cuda_kernel(name: str, dtypes: tuple[torch.dtype, ...], adapter: OpAdapter,
                load: Callable[[], None] | None = None) -> Kernel:
    """A :class:`Kernel` running ``adapter`` on CUDA tensors through the shared glue."""

    def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
        batch, seq, heads, head_dim = q.shape
        _check_call(name, adapter, q, k, causal)
        q, k, v = (pad_head_dim(t) for t in (q, k, v))
        if not adapter.native_gqa:
            k, v = expand_kv(k, heads), expand_kv(v, heads)
        out, lse = adapter.forward(q, k, v, causal, scale)
        return out.narrow(-1, 0, head_dim), normalise_lse(lse, batch, heads, seq)

    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        head_dim, n_kv = q.shape[-1], k.shape[2]
        _check_call(name, adapter, q, k, causal)
        dout, q, k, v, out = (pad_head_dim(t) for t in (dout, q, k, v, out))
        if not adapter.native_gqa:
            k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
        # the fused backwards read dout and lse assuming contiguous rows
        dq, dk, dv = adapter.backward(contiguous(dout), q, k, v, out, contiguous(lse.float()),
                                      causal, scale)
        dq, dk, dv = (t.narrow(-1, 0, head_dim) for t in (dq, dk, dv))
        if not adapter.native_gqa:
            dk, dv = reduce_kv_grad(dk, n_kv), reduce_kv_grad(dv, n_kv)
        return dq, dk, dv

    return Kernel(name, "cuda", dtypes, forward, backward, load=load)


__all__ = ["HALF", "OpAdapter", "cuda_kernel", "normalise_lse", "pad_head_dim"]

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
from usp.mask import Band, as_band, is_causal_square, shifted, visible_box

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
class OpMask:
    """A mask as the fused ops take it: a causal flag and a window ``(left, right)``, -1 for
    unbounded, both aligned bottom-right (query ``i`` of ``n_q`` sees key ``j`` of ``n_k`` iff
    ``-left <= j - i - (n_k - n_q) <= right``)."""

    causal: bool
    window: tuple[int, int] = (-1, -1)


@dataclass(frozen=True)
class OpAdapter:
    """One backend's raw op calls, on [B, S, H, D] tensors that meet the op's preconditions.

    ``forward(q, k, v, mask: OpMask, scale) -> (out, lse in the op's own shape)``;
    ``backward(dout, q, k, v, out, lse [B, H, S] fp32, mask: OpMask, scale) -> (dq, dk, dv)``.
    ``windows``: the op takes a window (without it, only full and causal square blocks).
    """

    forward: Callable
    backward: Callable
    native_gqa: bool
    max_head_dim: int | None = None
    windows: bool = False


def op_mask(name: str, adapter: OpAdapter, band: Band | None, n_q: int, n_k: int) -> OpMask:
    """The op's causal flag and window for ``band`` on a block trimmed to what it sees (so both
    window sides are >= 0; usp's bands count from the top-left corner, the ops' from the
    bottom-right one)."""
    if band is None:
        return OpMask(False)
    if is_causal_square(band, n_q, n_k):
        return OpMask(True)
    if not adapter.windows:
        raise ValueError(
            f"kernel {name!r} runs full and causal blocks only; this block needs a band (a "
            "sliding window, document boundaries or the stripe layout's strictly lower blocks): "
            "use kernel='cuda_flash', 'flash_attn' or 'auto'"
        )
    shift = n_k - n_q
    return OpMask(False, (-1 if band.lo is None else shift - band.lo,
                          -1 if band.hi is None else band.hi - shift))


def _check_head_dim(name: str, adapter: OpAdapter, head_dim: int) -> None:
    if adapter.max_head_dim is not None and head_dim > adapter.max_head_dim:
        raise ValueError(
            f"kernel {name!r} supports head dims up to {adapter.max_head_dim}, got {head_dim}; "
            "use another kernel (kernel='cuda_efficient' or 'math')"
        )


def cuda_kernel(name: str, dtypes: tuple[torch.dtype, ...], adapter: OpAdapter,
                load: Callable[[], None] | None = None) -> Kernel:
    """A :class:`Kernel` running ``adapter`` on CUDA tensors through the shared glue. A block
    whose band hides whole rows or columns runs on its visible box; the rest stays output 0,
    lse -inf and zero gradient."""

    def run_forward(q: Tensor, k: Tensor, v: Tensor, band: Band | None, scale: float):
        batch, seq, heads, head_dim = q.shape
        mask = op_mask(name, adapter, band, seq, k.shape[1])
        q, k, v = (pad_head_dim(t) for t in (q, k, v))
        if not adapter.native_gqa:
            k, v = expand_kv(k, heads), expand_kv(v, heads)
        out, lse = adapter.forward(q, k, v, mask, scale)
        return out.narrow(-1, 0, head_dim), normalise_lse(lse, batch, heads, seq)

    def run_backward(dout, q, k, v, out, lse, band: Band | None, scale: float):
        head_dim, n_kv = q.shape[-1], k.shape[2]
        mask = op_mask(name, adapter, band, q.shape[1], k.shape[1])
        dout, q, k, v, out = (pad_head_dim(t) for t in (dout, q, k, v, out))
        if not adapter.native_gqa:
            k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
        # the fused backwards read dout and lse assuming contiguous rows
        dq, dk, dv = adapter.backward(contiguous(dout), q, k, v, out, contiguous(lse.float()),
                                      mask, scale)
        dq, dk, dv = (t.narrow(-1, 0, head_dim) for t in (dq, dk, dv))
        if not adapter.native_gqa:
            dk, dv = reduce_kv_grad(dk, n_kv), reduce_kv_grad(dv, n_kv)
        return dq, dk, dv

    def forward(q: Tensor, k: Tensor, v: Tensor, mask: "bool | Band", scale: float):
        _check_head_dim(name, adapter, q.shape[-1])
        band = as_band(mask, q.shape[1], k.shape[1])
        box = visible_box(band, q.shape[1], k.shape[1])
        if box == (0, q.shape[1], 0, k.shape[1]):
            return run_forward(q, k, v, band, scale)
        if box is None:  # nothing visible: output 0, lse -inf
            return (torch.zeros_like(q),
                    torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"),
                               device=q.device))
        r0, r1, c0, c1 = box
        out, lse = run_forward(q.narrow(1, r0, r1 - r0), k.narrow(1, c0, c1 - c0),
                               v.narrow(1, c0, c1 - c0), shifted(band, r0, c0), scale)
        rows = (r0, q.shape[1] - r1)  # padding back to every row: out 0, lse -inf
        return (F.pad(out, (0, 0, 0, 0, *rows)),
                F.pad(lse, rows, value=float("-inf")))

    def backward(dout, q, k, v, out, lse, mask: "bool | Band", scale: float):
        _check_head_dim(name, adapter, q.shape[-1])
        band = as_band(mask, q.shape[1], k.shape[1])
        box = visible_box(band, q.shape[1], k.shape[1])
        if box == (0, q.shape[1], 0, k.shape[1]):
            return run_backward(dout, q, k, v, out, lse, band, scale)
        if box is None:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        r0, r1, c0, c1 = box
        dq, dk, dv = run_backward(
            dout.narrow(1, r0, r1 - r0), q.narrow(1, r0, r1 - r0), k.narrow(1, c0, c1 - c0),
            v.narrow(1, c0, c1 - c0), out.narrow(1, r0, r1 - r0), lse.narrow(2, r0, r1 - r0),
            shifted(band, r0, c0), scale)
        rows, cols = (r0, q.shape[1] - r1), (c0, k.shape[1] - c1)
        return (F.pad(dq, (0, 0, 0, 0, *rows)), F.pad(dk, (0, 0, 0, 0, *cols)),
                F.pad(dv, (0, 0, 0, 0, *cols)))

    return Kernel(name, "cuda", dtypes, forward, backward, load=load, bands=adapter.windows)


__all__ = ["HALF", "OpAdapter", "OpMask", "cuda_kernel", "normalise_lse", "pad_head_dim"]

"""The glue between usp's kernel contract (``base``) and the CUDA attention ops.

The ops differ in five ways, and this module absorbs all of them so that each backend's adapter is
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
- **masks**: an op gets only what it applies exactly: full blocks, causal squares, and windows
  where its own rewriting rules keep their meaning (:func:`flash2_runs`, :func:`flash3_runs`);
  any other band is cut into such parts (:mod:`usp.attention.kernels.bands`). No row reaches an
  op with no visible key (FlashAttention-2 would return lse = +inf for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from usp.attention.kernels.bands import Native, run_any_band
from usp.attention.kernels.base import HALF, Kernel, expand_kv, reduce_kv_grad
from usp.mask import Band

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
    ``-left <= j - i - (n_k - n_q) <= right``) — what the window *means*; each op's own rules
    for rewriting it are in :func:`flash2_runs` and :func:`flash3_runs`."""

    causal: bool
    window: tuple[int, int] = (-1, -1)


def window_of(band: Band, n_q: int, n_k: int) -> tuple[int, int]:
    """The bottom-right window ``(left, right)`` that means ``band`` on an ``n_q x n_k`` block."""
    shift = n_k - n_q  # usp's bands count from the top-left corner, the ops' from the bottom-right
    return (-1 if band.lo is None else shift - band.lo, -1 if band.hi is None else band.hi - shift)


def flash2_runs(band: Band, n_q: int, n_k: int) -> bool:
    """True when FlashAttention-2 (torch's bundled copy and flash-attn 2.x) applies
    :func:`window_of` ``band`` as meant on a trimmed ``n_q x n_k`` block.

    Its forward first turns a side ``>= n_k`` into -1 (unbounded) — its backward does not — and
    both then turn an unbounded side next to a bounded one into ``n_k``. The left side's ``n_k``
    always reaches key 0, but the right side's ``n_k`` stops row ``i`` at key
    ``i + 2 n_k - n_q``, short of the last key when ``n_q > n_k + 1``; and a right side ``>= n_k``
    means different masks in the forward and the backward. Such blocks run in chunks of rows
    (:func:`usp.attention.kernels.bands.split_band`).
    """
    left, right = window_of(band, n_q, n_k)
    if left >= n_k or right >= n_k:
        return False
    return not (right < 0 <= left and n_q > n_k + 1)


def flash3_runs(band: Band, n_q: int, n_k: int) -> bool:
    """FlashAttention-3 turns a left side ``>= n_k - 1`` and a right side ``>= n_q - 1`` into
    unbounded ones and an unbounded side into exactly those: every window means what it says."""
    return True


@dataclass(frozen=True)
class OpAdapter:
    """One backend's raw op calls, on [B, S, H, D] tensors that meet the op's preconditions.

    ``forward(q, k, v, mask: OpMask, scale) -> (out, lse in the op's own shape)``;
    ``backward(dout, q, k, v, out, lse [B, H, S] fp32, mask: OpMask, scale) -> (dq, dk, dv)``.
    ``window_rule(band, n_q, n_k)``: True when the op runs that band as a window exactly
    (:func:`flash2_runs`, :func:`flash3_runs`); None: the op has no window, and bands run as
    full and causal blocks (:mod:`usp.attention.kernels.bands`).
    """

    forward: Callable
    backward: Callable
    native_gqa: bool
    max_head_dim: int | None = None
    window_rule: Native | None = None


def op_mask(mask: "bool | Band", n_q: int, n_k: int) -> OpMask:
    """The op's causal flag and window for one part (:class:`~usp.attention.kernels.bands.Part`):
    False (every key), True (a causal square) or a band the op runs natively."""
    if isinstance(mask, bool):
        return OpMask(mask)
    return OpMask(False, window_of(mask, n_q, n_k))


def cuda_kernel(name: str, dtypes: tuple[torch.dtype, ...], adapter: OpAdapter,
                load: Callable[[], None] | None = None) -> Kernel:
    """A :class:`Kernel` running ``adapter`` on CUDA tensors through the shared glue. Any band
    runs: the op gets only parts whose mask it applies exactly (:func:`split_band` with the op's
    window rule); rows no part reaches keep output 0, lse -inf and zero gradient."""

    def op_forward(q: Tensor, k: Tensor, v: Tensor, mask: "bool | Band", scale: float):
        batch, seq, heads, head_dim = q.shape
        call_mask = op_mask(mask, seq, k.shape[1])
        q, k, v = (pad_head_dim(t) for t in (q, k, v))
        if not adapter.native_gqa:
            k, v = expand_kv(k, heads), expand_kv(v, heads)
        out, lse = adapter.forward(q, k, v, call_mask, scale)
        return out.narrow(-1, 0, head_dim), normalise_lse(lse, batch, heads, seq)

    def op_backward(dout, q, k, v, out, lse, mask: "bool | Band", scale: float):
        head_dim, n_kv = q.shape[-1], k.shape[2]
        call_mask = op_mask(mask, q.shape[1], k.shape[1])
        dout, q, k, v, out = (pad_head_dim(t) for t in (dout, q, k, v, out))
        if not adapter.native_gqa:
            k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
        # the fused backwards read dout and lse assuming contiguous rows
        dq, dk, dv = adapter.backward(contiguous(dout), q, k, v, out, contiguous(lse.float()),
                                      call_mask, scale)
        dq, dk, dv = (t.narrow(-1, 0, head_dim) for t in (dq, dk, dv))
        if not adapter.native_gqa:
            dk, dv = reduce_kv_grad(dk, n_kv), reduce_kv_grad(dv, n_kv)
        return dq, dk, dv

    forward, backward = run_any_band(op_forward, op_backward, adapter.window_rule)
    return Kernel(name, "cuda", dtypes, forward, backward, load=load,
                  max_head_dim=adapter.max_head_dim)


__all__ = ["HALF", "OpAdapter", "OpMask", "cuda_kernel", "flash2_runs", "flash3_runs",
           "normalise_lse", "op_mask", "pad_head_dim", "window_of"]

"""The kernel contract every local attention obeys, the masks it takes, and shared GQA helpers.

A kernel works on ``[B, S, H, D]`` tensors (heads third, the flash-attn convention). Its forward
returns the output in the input dtype and the log-sum-exp of each query row, ``[B, H, S]`` fp32
(fp64 for fp64 inputs). Its backward takes the *final* output and lse of the whole attention (not
this block's), so a ring can call it on every block and get exact partial gradients.

The mask is ``False`` (every key visible), ``True`` (causal, aligned top-left: query ``i`` sees
keys ``j <= i``) or a :class:`usp.mask.Band`: query ``i`` sees key ``j`` iff ``lo <= j - i <= hi``,
both counted from the block's first row and column — what every mask usp supports becomes inside
one block.

GQA: ``k``/``v`` may have fewer heads than ``q`` (``Hq % Hkv == 0``); query head ``j`` reads kv head
``j // (Hq // Hkv)``. Kernels whose op has no GQA expand locally (never before communication) and
sum the gradients back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor
HALF = (torch.float16, torch.bfloat16)  # the half-precision dtypes


@dataclass(frozen=True)
class Kernel:
    """A local attention: ``forward(q, k, v, mask, scale) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, mask, scale) -> (dq, dk, dv)``, ``mask`` as above.

    ``device_type`` is ``"cpu"``, ``"cuda"`` or ``"any"``. ``load`` raises ValueError when the
    kernel's optional package cannot be imported (checked lazily, when the kernel is asked for).
    ``max_head_dim``: the largest head dim it runs (None: any).
    ``bands``: the kernel runs any :class:`Band` (every kernel usp ships does: those whose ops
    take no window cut bands into full and causal blocks). A kernel without it runs only
    ``False`` and ``True`` on square blocks; :func:`usp.attention.kernels.resolve_kernel` wraps
    it so that it runs any band the same way (:mod:`usp.attention.kernels.bands`).
    ``upcast_half_backward``: the ring runs this kernel's backward in fp32 for fp16/bf16 inputs,
    because its half-precision partial gradients lose too much when R of them are summed (the CPU
    flash kernel, measured); CUDA kernels keep their half-precision backward and the ring sums
    their partials in fp32.
    """

    name: str
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    forward: Callable
    backward: Callable
    load: Callable[[], None] | None = None
    upcast_half_backward: bool = False
    bands: bool = True
    max_head_dim: int | None = None

    def check(self, q: Tensor) -> None:
        """Raise ValueError unless this kernel can run on tensors like ``q``."""
        if self.device_type != "any" and q.device.type != self.device_type:
            raise ValueError(
                f"kernel {self.name!r} runs on {self.device_type}, the tensors are on {q.device}"
            )
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise ValueError(
                f"kernel {self.name!r} supports {names}, not {q.dtype}; use kernel='math' for it"
            )
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            raise ValueError(
                f"kernel {self.name!r} supports head dims up to {self.max_head_dim}, got "
                f"{q.shape[-1]}; use another kernel (kernel='auto' finds one)"
            )
        if self.load is not None:
            self.load()


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def expand_kv(kv: Tensor, n_q_heads: int) -> Tensor:
    # [B, S, Hkv, D] -> [B, S, Hq, D]
    repeats = n_q_heads // kv.shape[2]
    return kv if repeats == 1 else kv.repeat_interleave(repeats, dim=2)


def reduce_kv_grad(grad: Tensor, n_kv_heads: int) -> Tensor:
    # [B, S, Hq, D] -> [B, S, Hkv, D]: sum over the query heads that shared each kv head
    batch, seq, n_q_heads, dim = grad.shape
    if n_q_heads == n_kv_heads:
        return grad
    return grad.view(batch, seq, n_kv_heads, n_q_heads // n_kv_heads, dim).sum(dim=3)


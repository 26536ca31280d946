"""Mamba-2's fused chunked scan (mamba_ssm's Triton kernel) as a block's first phase, on CUDA
where mamba_ssm is installed.

``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, seq_idx=..., return_final_states=True)``
scans a block from a zero state: its outputs ``y0`` and its final state ``F`` (``[B, H, P, N]``;
the state restarts wherever ``seq_idx`` changes), forward and backward (its autograd takes the
final state's gradient too). That is phase 1 of the split scan (:mod:`usp.scan.ssd_local`);
what the state entering the block adds is linear and cheap, so it runs in torch on top:

- the block's transition ``m = exp(Σ_t a_t)`` per head (0 when a segment starts inside), so
  ``S_out = m · S_in + F``;
- each output of the entry segment gains ``exp(Σ_{j<=t} a_j) · C_t^T S_in``.

The kernel is mamba_ssm's own; this module only composes it (``tests/mamba_ssm_standin.py``
holds a CPU stand-in of the kernel's semantics to which the composition is held).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch

from usp.scan.segments import BlockSegments

Tensor = torch.Tensor


@lru_cache(maxsize=1)
def _installed():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or its Triton build does not load here
        return None
    return mamba_chunk_scan_combined


def fused_chunk_scan(x: Tensor):
    """mamba_ssm's ``mamba_chunk_scan_combined`` for tensors like ``x`` (CUDA), or None: the
    torch path (:mod:`usp.scan.ssd_local`) runs."""
    return _installed() if x.is_cuda else None


@lru_cache(maxsize=4)
def _takes_state_dtype(kernel) -> bool:
    """Whether this mamba_ssm's kernel takes ``state_dtype`` (releases from mid-2026 on), looked
    up once, not on every layer's call."""
    return "state_dtype" in inspect.signature(kernel).parameters


@dataclass
class FusedBlock:
    """Phase 1 of one block by the kernel: what the outputs need besides the entering state."""

    y: Tensor  # [B, L, H, P]: the outputs from a zero entering state (compute dtype)
    c: Tensor  # [B, L, G, N]
    reach: Tensor  # [B, L, H]: exp(Σ_{j<=t} a_j) while t is in the entry segment, else 0
    final: Tensor  # [B, H, N, P]: F, the state leaving the block from a zero start
    transition: Tensor  # [B, H]: m


def fused_block(kernel, x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor,
                segments: BlockSegments | None, chunk: int, dtype: torch.dtype) -> FusedBlock:
    """Phase 1 by ``kernel``: x ``[B, L, H, P]``, dt ``[B, L, H]`` (discretised), a ``[H]``,
    b/c ``[B, L, G, N]``; the arithmetic on top in ``dtype``."""
    batch, length = x.shape[:2]
    seq_idx = None
    if segments is not None:
        seq_idx = segments.ids.to(x.device).expand(batch, -1).to(torch.int32).contiguous()
    options = {}
    if _takes_state_dtype(kernel):
        options["state_dtype"] = dtype  # the state leaves the block in fp32 (fp64 inputs: fp64)
    y, final = kernel(x, dt, a, b, c, chunk, seq_idx=seq_idx, return_final_states=True,
                      **options)
    cum = (dt.to(dtype) * a.to(dtype)).cumsum(dim=1)  # [B, L, H]
    reach, through = cum.exp(), None
    if segments is not None:
        ids, entry = segments.ids.to(x.device), segments.entry.to(x.device)
        in_entry = (ids == entry[:, None]).to(dtype)  # [rows, L]: a prefix of the block
        reach = reach * in_entry[..., None]
        through = in_entry[:, -1:]  # [rows, 1]: no restart inside the block
    transition = cum[:, -1].exp()
    if through is not None:
        transition = transition * through
    return FusedBlock(y.to(dtype), c.to(dtype), reach, final.to(dtype).transpose(-1, -2),
                      transition)


def fused_output(block: FusedBlock, entering: Tensor | None) -> Tensor:
    """Phase 2: y ``[B, L, H, P]`` given the state ``entering`` ``[B, H, N, P]`` (None: zero)."""
    if entering is None:
        return block.y
    groups = block.c.shape[2]
    state = entering.unflatten(1, (groups, -1))  # [B, G, H/G, N, P]
    carried = torch.einsum("blgn,bgrnp->blgrp", block.c, state).flatten(2, 3)  # [B, L, H, P]
    return block.y + block.reach[..., None] * carried


def fused_leaving(block: FusedBlock, entering: Tensor | None) -> Tensor:
    """The state after the block: ``m · S_in + F``."""
    if entering is None:
        return block.final
    return block.transition[..., None, None] * entering + block.final

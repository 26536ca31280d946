"""A CPU stand-in of mamba_ssm's ``mamba_chunk_scan_combined`` (the Triton kernel usp.scan.fused
calls on CUDA), for the arguments usp passes, with the kernel's semantics as its source
(``mamba_ssm/ops/triton/ssd_combined.py``) states them:

- x ``[B, L, H, P]``, dt ``[B, L, H]``, A ``[H]``, B/C ``[B, L, G, N]`` (its asserts: H a
  multiple of G, the shapes alike, seq_idx ``[B, L]``);
- dt gets ``dt_bias``, then softplus (``dt_softplus``), then the clamp to ``dt_limit`` unless
  it is ``(0, inf)``;
- the state restarts wherever ``seq_idx`` changes, inside a chunk and between chunks;
- returns the outputs in x's dtype and, with ``return_final_states``, the final state
  ``[B, H, P, N]`` in ``state_dtype``, or C's dtype when that is not given.

It runs the token-by-token recurrence (usp.scan.reference), which tests/test_scan.py holds to
transformers' chunked torch path. ``z``, ``D``, ``initial_states`` and ``cu_seqlens`` are not
what usp passes: the stand-in refuses them rather than guess.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from usp.scan.reference import ssd_recurrence


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False,
                              state_dtype=None):
    for name, value in (("D", D), ("z", z), ("initial_states", initial_states),
                        ("cu_seqlens", cu_seqlens)):
        if value is not None:
            raise NotImplementedError(f"the stand-in does not take {name}")
    assert not return_varlen_states and chunk_size >= 1
    batch, length, heads, _ = x.shape
    assert heads % B.shape[2] == 0 and B.shape == C.shape == (batch, length) + B.shape[2:]
    assert dt.shape == (batch, length, heads) and A.shape == (heads,)
    if seq_idx is not None:
        assert seq_idx.shape == (batch, length) and seq_idx.dtype == torch.int32
    step = dt.float() if dt.dtype != torch.float64 else dt
    if dt_bias is not None:
        step = step + dt_bias
    if dt_softplus:
        step = F.softplus(step)
    if tuple(dt_limit) != (0.0, math.inf):
        step = step.clamp(min=dt_limit[0], max=dt_limit[1])
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    out, final = ssd_recurrence(x.to(work), step.to(work), A.to(work), B.to(work), C.to(work),
                                documents=seq_idx)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    return out, final.to(state_dtype or C.dtype)

"""ssd_scan: Mamba-2's state-space duality (SSD) over a sequence split on ring × Ulysses ranks.

The call's path, on every rank:

1. ``dt`` discretised on this rank's tokens (``softplus(dt + dt_bias)`` clamped to ``dt_limit``:
   per token and head, so it needs no neighbour);
2. the block this rank scans: its own shard, every head (``ulysses="state"``, what "auto"
   picks); with ``"heads"`` one all-to-all hands it every token of its Ulysses row (the ring
   block) for its slice of the heads, with the B/C groups those heads read
   (:mod:`usp.scan.slots`);
3. the block's first phase (:func:`usp.scan.ssd_local.block_states`, or on CUDA mamba_ssm's
   fused kernel where installed: :mod:`usp.scan.fused`): everything but the state entering the
   block, and the block's affine map ``S_out = m · S_in + F`` (``m`` a scalar per head: passing
   the state on costs one multiply-add);
4. the chain (:mod:`usp.scan.chain`): ``S_in`` from the block before, ``m · S_in + F`` on to
   the next — along all ring × ulysses shards in sequence order (``[B, H, N, P]`` per rank and
   direction), or along the ring (``[B, H_U, N, P]``) under ``ulysses="heads"``;
5. the outputs with ``S_in`` folded in, the inverse all-to-all (``"heads"``), the ``D`` skip.

The backward is autograd's, with the chain's messages reversed: each rank receives the gradient
of the state it sent and sends the gradient of the state it received.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from usp.attention.heads import heads_of
from usp.choices import scan_ulysses
from usp.scan.calls import (check_groups, check_positive_int, check_same, check_scan_layout,
                            check_tensor, check_ulysses_mode, describe, digest,
                            scan_block, sequence_segments)
from usp.scan.chain import chain_of, pass_along
from usp.scan.fused import fused_block, fused_chunk_scan, fused_leaving, fused_output
from usp.scan.segments import block_segments
from usp.scan.slots import from_rank_heads, rank_heads_of, to_rank_heads
from usp.scan.ssd_local import block_output, block_states, compute_dtype, leaving_state
from usp.topology import Topology

Tensor = torch.Tensor


def _check(x, dt, a, b, c, d, dt_bias, dt_limit, chunk_size, topology, layout,
           ulysses) -> None:
    check_scan_layout(layout, topology)
    check_ulysses_mode(ulysses)
    check_tensor("x", x, 4, "[B, S_local, H, P]")
    check_tensor("dt", dt, 3, "[B, S_local, H]")
    check_tensor("A", a, 1, "[H]")
    check_tensor("B", b, 4, "[B, S_local, G, N]")
    check_tensor("C", c, 4, "[B, S_local, G, N]")
    batch, length, heads, _ = x.shape
    if tuple(dt.shape) != (batch, length, heads):
        raise ValueError(f"dt {tuple(dt.shape)} must be [B, S_local, H] = "
                         f"{(batch, length, heads)} (x is {tuple(x.shape)})")
    if b.shape != c.shape or tuple(b.shape[:2]) != (batch, length):
        raise ValueError(f"B {tuple(b.shape)} and C {tuple(c.shape)} must both be "
                         f"[B, S_local, G, N] with B, S_local = {batch}, {length} as x")
    check_groups(heads, b.shape[2], "x and B/C")
    for name, value in (("A", a), ("D", d), ("dt_bias", dt_bias)):
        if value is None:
            continue
        check_tensor(name, value, 1, "[H]")
        if value.shape[0] != heads:
            raise ValueError(f"{name} {tuple(value.shape)} must be [H] = [{heads}]")
    for name, value in (("dt", dt), ("A", a), ("B", b), ("C", c), ("D", d),
                        ("dt_bias", dt_bias)):
        if value is not None:
            check_same(name, value, x, "x")
    check_positive_int("chunk_size", chunk_size)
    if (not isinstance(dt_limit, tuple) or len(dt_limit) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)
            or math.isnan(dt_limit[0]) or math.isnan(dt_limit[1]) or dt_limit[0] > dt_limit[1]):
        raise ValueError(f"dt_limit={dt_limit!r} must be a pair (low, high) of numbers, "
                         f"low <= high")


def discretised_dt(dt: Tensor, dt_bias: Tensor | None, softplus: bool,
                   limit: tuple[float, float], dtype: torch.dtype) -> Tensor:
    """``dt`` ``[B, S, H]`` as the scan uses it, in ``dtype``: ``+ dt_bias``, softplus,
    clamped to ``limit`` (Mamba-2's order)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if softplus:
        dt = F.softplus(dt)
    if limit != (0.0, math.inf):
        dt = dt.clamp(min=limit[0], max=limit[1])
    return dt


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, topology: Topology, *,
             chunk_size: int = 64, D: Tensor | None = None, dt_bias: Tensor | None = None,
             dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
             layout: str = "contiguous", documents=None, cu_seqlens=None,
             seq_len: int | None = None, ulysses: str = "auto") -> Tensor:
    """Mamba-2's SSD scan of a sequence split over ring × ulysses ranks, exact.

    Shapes and meaning are those of transformers' ``mamba2_chunk_scan`` (Bamba, NemotronH,
    Falcon-H1, Zamba2) on this rank's contiguous shard: x ``[B, S_RU, H, P]``, dt
    ``[B, S_RU, H]``, A ``[H]`` (negative), B/C ``[B, S_RU, G, N]`` (head ``h`` reads group
    ``h // (H/G)``), D and dt_bias ``[H]``. Per head, with the state ``S`` ``[P, N]``::

        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t + D x_t

    Returns y ``[B, S_RU, H, P]`` in x's dtype, accumulated in fp32 (fp64 for fp64 inputs).
    ``chunk_size`` only sets the work's grain; the result does not depend on it.
    ``documents`` / ``cu_seqlens`` / ``seq_len`` describe the global sequence as for
    :func:`usp.usp_attention`: the state restarts from zero at every document (and padding
    slot). With ring > 1 the layout must be ``contiguous``. ``ulysses``: ``"state"`` (what
    ``"auto"`` picks here: passing the state on costs one multiply-add) — each rank scans its own
    shard, every head, and the state passes on along all ring × ulysses shards in sequence order
    (no all-to-all; one ``[B, H, N, P]`` state per rank and direction); ``"heads"`` — an
    all-to-all splits the heads over the Ulysses ranks, which then scan the ring block (head
    counts Ulysses cannot split run on zero-padded heads, exact), and the state passes along the
    ring only. Bad input raises the same ValueError on every rank of the
    sequence group before any collective. Differentiable in every tensor argument.
    """
    error, segments = None, None
    try:
        _check(x, dt, A, B, C, D, dt_bias, dt_limit, chunk_size, topology, layout, ulysses)
        segments = sequence_segments(
            x.shape[1], x.shape[0], topology, layout, documents=documents,
            cu_seqlens=cu_seqlens, seq_len=seq_len)
    except Exception as exc:  # any failure before a collective reaches every rank, as one error
        error = exc
    description = describe({"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D,
                            "dt_bias": dt_bias}, layout=layout, chunk_size=chunk_size,
                           dt_softplus=dt_softplus, dt_limit=dt_limit, documents=digest(segments),
                           ulysses=ulysses)
    topology.agree_on_call(description, error)

    ulysses = scan_ulysses(ulysses, topology.sequence_size, matrix_transition=False)
    dtype = compute_dtype(x.dtype)
    step = discretised_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # [B, S_RU, H]
    place = rank_heads_of(x.shape[2], B.shape[2], topology, split=ulysses == "heads")
    # [B, S_RU, H, ..] -> [B, S_block, slots, ..]: this rank's block, its heads
    (x_slots, step_slots), (b_slots, c_slots) = to_rank_heads(
        place, [x, step[..., None]], [B, C])
    decay_rate = heads_of(A.to(dtype), place.heads)  # [slots]; 0 in a padding slot
    here = block_segments(segments, *scan_block(topology, ulysses))
    kernel = fused_chunk_scan(x)  # mamba_ssm's, on CUDA where installed
    if kernel is not None:
        block = fused_block(kernel, x_slots, step_slots[..., 0], decay_rate, b_slots, c_slots,
                            here, chunk_size, dtype)
        output, leaving = fused_output, fused_leaving
    else:
        block = block_states(x_slots, step_slots[..., 0], decay_rate, b_slots, c_slots, here,
                             chunk_size)
        output, leaving = block_output, leaving_state
    chain = chain_of(topology, over_ulysses=ulysses == "state")
    entering, token = pass_along(chain, lambda state: leaving(block, state), block.final,
                                 anchor=block.final)
    y = output(block, entering)  # [B, S_R, slots, P]
    if token is not None:
        y = y + token
    chain.finish()
    y = from_rank_heads(place, y)  # [B, S_RU, H, P]
    if D is not None:
        y = y + D.to(dtype)[:, None] * x.to(dtype)
    return y.to(x.dtype)

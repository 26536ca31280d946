"""Mamba-2's state-space duality (SSD) on one rank's block, in two phases around the ring.

Per head, with the state ``S`` ``[N, P]`` (d_state x head_dim) and ``a_t = dt_t · A <= 0``::

    S_t = exp(a_t) · S_{t-1} + B_t (dt_t x_t)^T        y_t = S_t^T C_t   (+ D x_t: the caller's)

and ``S_{t-1} = 0`` at the first token of every segment (:mod:`usp.scan.segments`). The block is
cut into chunks of ``Q`` tokens. Inside a chunk the output is a masked attention-like product,
``y_t = Σ_{s<=t, same segment} (C_t·B_s) exp(Σ_{s<j<=t} a_j) dt_s x_s``; between chunks only the
state travels. The state that enters the block, ``S_in``, reaches token ``t`` as
``exp(Σ_{j<=t} a_j) C_t^T S_in`` while ``t`` is in the entry segment, and leaves the block as
``m · S_in`` with the scalar ``m`` per head (zero if a segment starts inside). So:

- :func:`block_states` (phase 1, no ``S_in``): each chunk's start state from a zero block start,
  the block's final state ``F`` and transition ``m``: ``S_out = m · S_in + F``;
- :func:`block_output` (phase 2): the outputs, with ``S_in`` folded into each chunk's start
  state (``carry_c · S_in``), at the cost of one addition per chunk.

All arithmetic runs in fp32 (fp64 for fp64 inputs); tensors are laid out ``[B, H, c, Q, ..]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usp.scan.segments import BlockSegments, chunk_masks

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_chunks(t: Tensor, chunk: int) -> Tensor:
    """``[B, L, H, ..]`` -> ``[B, H, c, Q, ..]`` (zeros after the last token)."""
    pad = -t.shape[1] % chunk
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
    t = t.unflatten(1, (-1, chunk))  # [B, c, Q, H, ..]
    return t.movedim(3, 1)  # [B, H, c, Q, ..]


def from_chunks(t: Tensor, length: int) -> Tensor:
    """``[B, H, c, Q, ..]`` -> ``[B, length, H, ..]``."""
    t = t.movedim(1, 3).flatten(1, 2)  # [B, c·Q, H, ..]
    return t[:, :length]


def heads_side_by_side(t: Tensor, groups: int) -> Tensor:
    """``[B, H, c, R, D]`` -> ``[B, G, c, R, H/G · D]``: the heads that read one group side by
    side in the last dim, so a product with the group's ``[B, G, c, .., R]`` tensor is one
    batched matmul that never copies the group to its heads (a broadcast matmul would, and its
    backward would keep the copy)."""
    batch, heads, chunks, rows, width = t.shape
    t = t.reshape(batch, groups, heads // groups, chunks, rows, width)
    return t.permute(0, 1, 3, 4, 2, 5).reshape(batch, groups, chunks, rows, -1)


def heads_apart(t: Tensor, width: int) -> Tensor:
    """The inverse of :func:`heads_side_by_side`: ``[B, G, c, R, H/G · D]`` -> ``[B, H, c, R,
    D]`` with ``D = width``."""
    batch, groups, chunks, rows, _ = t.shape
    t = t.reshape(batch, groups, chunks, rows, -1, width).permute(0, 1, 4, 2, 3, 5)
    return t.reshape(batch, -1, chunks, rows, width)


def decay_matrix(log_decay: Tensor) -> Tensor:
    """``[.., Q]`` log decays -> ``[.., Q, Q]`` with ``exp(Σ_{s<j<=t} a_j)`` at ``[t, s]`` for
    ``s <= t`` and 0 above the diagonal. Summing each range directly (a masked cumulative sum)
    keeps the short ranges exact where a difference of two long prefix sums would cancel."""
    size = log_decay.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=log_decay.device).tril()
    strictly_lower = lower.tril(-1)
    spread = log_decay[..., :, None].expand(*log_decay.shape, size)  # [t, s] = a_t
    sums = spread.masked_fill(~strictly_lower, 0).cumsum(dim=-2)  # [t, s] = Σ_{s<j<=t} a_j
    return sums.masked_fill(~lower, float("-inf")).exp()


def exclusive_carry(log_decay_end: Tensor, through: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per chunk ``c`` the factor of the block's entering state at the chunk's start
    (``Π_{j<c} γ_j``) and the block's whole transition ``m = Π_j γ_j``, where
    ``γ_j = exp(cum_end_j) · through_j``. ``log_decay_end`` ``[B, H, c]``."""
    total = log_decay_end.cumsum(dim=-1)  # [B, H, c]: Σ_{j<=c}
    before = F.pad(total[..., :-1], (1, 0))  # Σ_{j<c}
    carry, transition = before.exp(), total[..., -1].exp()
    if through is not None:  # 0 from the first chunk a segment starts in
        alive = through.cumprod(dim=-1)  # [rows, c], no gradient: a 0/1 mask
        carry = carry * F.pad(alive[..., :-1], (1, 0), value=1.0)[:, None]
        transition = transition * alive[:, None, -1]
    return carry, transition


@dataclass
class SSDBlock:
    """Phase 1 of one block: what the outputs need besides the entering state."""

    length: int
    x_dt: Tensor  # [B, H, c, Q, P]: dt_s x_s
    b: Tensor  # [B, G, c, Q, N]: each group once (its run of H/G heads side by side)
    c: Tensor  # [B, G, c, Q, N]
    log_decay: Tensor  # [B, H, c, Q]: a_t
    cum: Tensor  # [B, H, c, Q]: Σ_{j<=t} a_j inside the chunk
    same: Tensor | None  # [rows, 1, c, Q, Q]
    from_entry: Tensor | None  # [rows, 1, c, Q]
    starts: Tensor  # [B, H, c, N, P]: each chunk's start state from a zero block start
    carry: Tensor  # [B, H, c]: the entering state's factor at each chunk's start
    final: Tensor  # [B, H, N, P]: F, the state leaving the block from a zero start
    transition: Tensor  # [B, H]: m


def block_states(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor,
                 segments: BlockSegments | None, chunk: int) -> SSDBlock:
    """Phase 1: x ``[B, L, H, P]``, dt ``[B, L, H]``, a ``[H]`` (A, negative), b/c
    ``[B, L, G, N]``, each group read by a run of ``H/G`` consecutive heads (never repeated to
    the heads: the products take the heads side by side, so the backward keeps each group
    once)."""
    dtype = compute_dtype(x.dtype)
    length = x.shape[1]
    dt = dt.to(dtype)
    x_dt = to_chunks(x.to(dtype) * dt[..., None], chunk)  # [B, H, c, Q, P]
    log_decay = to_chunks(dt * a.to(dtype), chunk)  # [B, H, c, Q]
    b, c = to_chunks(b.to(dtype), chunk), to_chunks(c.to(dtype), chunk)  # [B, G, c, Q, N]
    groups = b.shape[1]
    cum = log_decay.cumsum(dim=-1)
    same = from_entry = through = None
    to_end = (cum[..., -1:] - cum).exp()  # [B, H, c, Q]: the decay from s to the chunk's end
    if segments is not None:
        masks = chunk_masks(segments, chunk, dtype, x.device)
        same, from_entry = masks.same[:, None], masks.from_entry[:, None]
        to_end = to_end * masks.to_end[:, None]
        through = masks.through
    # each chunk's own contribution to the state at its end: Σ_s decay(s→end) B_s (dt_s x_s)^T
    own = heads_apart(b.transpose(-1, -2) @ heads_side_by_side(x_dt * to_end[..., None], groups),
                      x_dt.shape[-1])  # [B, H, c, N, P]
    gamma = cum[..., -1].exp()  # [B, H, c]
    if through is not None:
        gamma = gamma * through[:, None]
    state = own.new_zeros(own.shape[:2] + own.shape[3:])  # [B, H, N, P]
    starts = []
    for index in range(own.shape[2]):  # the chunks one after another: only the state travels
        starts.append(state)
        state = gamma[:, :, index, None, None] * state + own[:, :, index]
    carry, transition = exclusive_carry(cum[..., -1], through)
    return SSDBlock(length, x_dt, b, c, log_decay, cum, same, from_entry,
                    torch.stack(starts, dim=2), carry, state, transition)


def block_output(block: SSDBlock, entering: Tensor | None) -> Tensor:
    """Phase 2: y ``[B, L, H, P]`` (compute dtype, without the D skip) given the state
    ``entering`` ``[B, H, N, P]`` the block starts from (None: zero)."""
    # inside each chunk: (C_t·B_s) · decay(s→t), masked to s <= t in one segment
    groups = block.b.shape[1]
    scores = ((block.c @ block.b.transpose(-1, -2))[:, :, None]  # [B, G, 1, c, Q, Q]
              * decay_matrix(block.log_decay).unflatten(1, (groups, -1))).flatten(1, 2)
    if block.same is not None:
        scores = scores * block.same
    y = scores @ block.x_dt  # [B, H, c, Q, P]
    starts = block.starts
    if entering is not None:
        starts = starts + block.carry[..., None, None] * entering[:, :, None]
    reach = block.cum.exp()  # decay from the chunk start to t
    if block.from_entry is not None:
        reach = reach * block.from_entry
    y = y + heads_apart(block.c @ heads_side_by_side(starts, groups),
                        starts.shape[-1]) * reach[..., None]
    return from_chunks(y, block.length)


def leaving_state(block: SSDBlock, entering: Tensor | None) -> Tensor:
    """The state after the block: ``m · S_in + F``."""
    if entering is None:
        return block.final
    return block.transition[..., None, None] * entering + block.final

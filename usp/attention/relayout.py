"""Moving each ring block's tokens from one layout to another, across the ring, and back.

A sequence sharded ``contiguous`` (what a scan layer needs: each ring rank one block in
order) leaves causal attention unbalanced: the last ring rank meets ``(2R-1)/R²`` of the causal
pairs instead of ``1/R``. ``usp_attention(..., layout="contiguous", ring_layout="zigzag")``
runs the ring on the balanced layout instead: after the Ulysses all-to-all each rank holds its
ring block for its heads; one all-to-all over the ring group re-lays q, k and v into
``ring_layout``'s blocks, the ring runs on them, and the output travels back the same way (the
backward runs the inverse moves). Every token of the block that ``ring_layout`` also puts on
this rank stays; the rest move once each way (at R = 2 half of them). The moves are exact
permutations, so the result is the one the input's layout gives, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.comm import nbytes, record
from usp.layout import ring_block_positions

Tensor = torch.Tensor


@dataclass(frozen=True)
class Moves:
    """One rank's part of a relayout: which of its tokens go to each ring rank (``send``, in
    rank order, with ``send_counts``), how many it receives from each (``receive_counts``), and
    where each received token lands (``place``: the received tokens in the target block's
    order)."""

    send: Tensor
    send_counts: tuple[int, ...]
    receive_counts: tuple[int, ...]
    place: Tensor


@lru_cache(maxsize=64)
def moves(slots: int, ring: int, rank: int, source: str, target: str) -> Moves:
    """The moves that turn ring rank ``rank``'s block of ``slots`` positions laid out as
    ``source`` into its block laid out as ``target`` (both :data:`usp.layout.LAYOUTS`)."""
    blocks = {layout: [ring_block_positions(slots, ring, r, layout) for r in range(ring)]
              for layout in (source, target)}
    owner = torch.empty(slots, dtype=torch.long)  # position -> target rank
    index = torch.empty(slots, dtype=torch.long)  # position -> its slot in the target block
    for r, positions in enumerate(blocks[target]):
        owner[positions] = r
        index[positions] = torch.arange(len(positions))
    held = blocks[source][rank]
    send = torch.cat([torch.nonzero(owner[held] == r).flatten() for r in range(ring)])
    # what arrives: from each source rank, its tokens owned here, in that rank's send order
    arriving = torch.cat([positions[owner[positions] == rank] for positions in blocks[source]])
    return Moves(send=send,
                 send_counts=tuple(int((owner[held] == r).sum()) for r in range(ring)),
                 receive_counts=tuple(int((owner[p] == rank).sum()) for p in blocks[source]),
                 place=torch.argsort(index[arriving]))


def _move(x: Tensor, group: dist.ProcessGroup, plan: Moves) -> Tensor:
    """``x [B, L, ..]`` (the source block) -> the target block ``[B, L, ..]``."""
    with record_function("usp::relayout"):
        send = x.index_select(1, plan.send.to(x.device)).movedim(1, 0).contiguous()
        receive = send.new_empty((sum(plan.receive_counts),) + tuple(send.shape[1:]))
        kept = plan.send_counts[dist.get_rank(group)]
        record("all_to_all", nbytes(send) * (send.shape[0] - kept) // max(1, send.shape[0]))
        dist.all_to_all_single(receive, send, list(plan.receive_counts),
                               list(plan.send_counts), group=group)
        return receive.index_select(0, plan.place.to(x.device)).movedim(0, 1)


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, slots, ring, rank, source, target):
        ctx.args = (group, slots, ring, rank, source, target)
        return _move(x, group, moves(slots, ring, rank, source, target))

    @staticmethod
    def backward(ctx, grad):
        group, slots, ring, rank, source, target = ctx.args
        # the inverse permutation: the gradient of each token goes back to where it came from
        return (_move(grad, group, moves(slots, ring, rank, target, source)),
                None, None, None, None, None, None)


def relayout(x: Tensor, group: dist.ProcessGroup, source: str, target: str) -> Tensor:
    """This ring rank's block ``x [B, L, ..]`` laid out as ``source``, re-laid as ``target``
    (the ring group's blocks of ``L x ring`` slots). Differentiable."""
    if source == target:
        return x
    ring, rank = dist.get_world_size(group), dist.get_rank(group)
    return _Relayout.apply(x, group, x.shape[1] * ring, ring, rank, source, target)

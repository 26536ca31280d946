"""Layouts: which global token positions each rank holds, and the ring's causal block schedule.

A layout maps the global sequence onto the ring's ``R`` blocks; the ring block of ring rank ``r``
is then cut into ``U`` contiguous pieces, piece ``u`` to Ulysses rank ``u`` (the Ulysses
all-to-all concatenates the pieces back in Ulysses-rank order, giving the ring its block).

- ``contiguous``: block r = tokens [r·L, (r+1)·L), L = S/R. Causal work is imbalanced.
- ``zigzag``: the sequence in 2R chunks of c = S/2R; block r = chunk r ‖ chunk 2R−1−r.
- ``stripe``: block r = tokens r, r+R, r+2R, … (token t goes to ring rank t mod R).

Tokens, labels and RoPE positions must all be permuted the same way: use
:func:`shard_sequence` for the tensors and :func:`sequence_positions` for the positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from usp.comm import all_gather_stacked
from usp.topology import Topology

Tensor = torch.Tensor
LAYOUTS = ("contiguous", "zigzag", "stripe")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def check_sequence_length(seq_len: int, ring: int, ulysses: int, layout: str) -> None:
    """Raise ValueError unless ``layout`` can split ``seq_len`` over ring × ulysses evenly."""
    check_layout(layout)
    need = [ring * ulysses] + ([2 * ring] if layout == "zigzag" else [])
    for divisor in need:
        if seq_len % divisor != 0:
            multiple = ring * ulysses * (2 if layout == "zigzag" and ulysses % 2 else 1)
            raise ValueError(
                f"sequence length {seq_len} cannot be split by layout {layout!r} over ring={ring} x "
                f"ulysses={ulysses}: it must be a multiple of {multiple}; pad it to "
                f"{-(-seq_len // multiple) * multiple}"
            )


def ring_block_positions(seq_len: int, ring: int, ring_rank: int, layout: str) -> Tensor:
    """Global positions of ring rank ``ring_rank``'s block, in the order the block holds them."""
    check_layout(layout)
    block = seq_len // ring
    if layout == "contiguous":
        return torch.arange(ring_rank * block, (ring_rank + 1) * block)
    if layout == "zigzag":
        chunk = block // 2
        first = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
        mirror = 2 * ring - 1 - ring_rank
        return torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk)])
    return torch.arange(ring_rank, seq_len, ring)


def shard_positions(
    seq_len: int, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int, layout: str
) -> Tensor:
    """Global positions held by the rank at (ring_rank, ulysses_rank)."""
    check_sequence_length(seq_len, ring, ulysses, layout)
    piece = seq_len // (ring * ulysses)
    block = ring_block_positions(seq_len, ring, ring_rank, layout)
    return block[ulysses_rank * piece : (ulysses_rank + 1) * piece]


def sequence_positions(seq_len: int, topology: Topology, layout: str = "zigzag") -> Tensor:
    """LongTensor ``[S_local]``: the global positions of this rank's tokens (for RoPE and labels)."""
    return shard_positions(
        seq_len, topology.ring_size, topology.ulysses_size, topology.ring_rank,
        topology.ulysses_rank, layout,
    )


def shard_sequence(x: Tensor, topology: Topology, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """This rank's shard ``[.., S_local, ..]`` of a global tensor ``[.., S, ..]`` (along ``dim``)."""
    positions = sequence_positions(x.shape[dim], topology, layout).to(x.device)
    if layout == "contiguous":
        return x.narrow(dim, int(positions[0]), positions.numel())
    return x.index_select(dim, positions)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, topology, layout, dim):
        ring, ulysses = topology.ring_size, topology.ulysses_size
        seq_len = x_local.shape[dim] * ring * ulysses
        stacked = all_gather_stacked(x_local, topology.sequence_group)  # [G, .., S_local, ..]
        positions = torch.cat([
            shard_positions(seq_len, ring, ulysses, index // ulysses, index % ulysses, layout)
            for index in topology.sequence_index_of_group_rank
        ]).to(x_local.device)
        gathered = stacked.movedim(0, dim).flatten(dim, dim + 1)  # [.., G*S_local, ..]
        out = torch.empty_like(gathered).index_copy_(dim, positions, gathered)
        ctx.dim, ctx.own = dim, sequence_positions(seq_len, topology, layout).to(x_local.device)
        return out

    @staticmethod
    def backward(ctx, grad):
        # the gathered tensor is replicated over the sequence group: each rank keeps its slice
        return grad.index_select(ctx.dim, ctx.own), None, None, None


def unshard_sequence(
    x_local: Tensor, topology: Topology, layout: str = "zigzag", dim: int = 1
) -> Tensor:
    """Gather every rank's shard back into global order ``[.., S, ..]`` on every rank.

    Differentiable: the result is treated as replicated over the sequence group, so the backward
    hands each rank its own slice of the gradient (right when all ranks compute the same function
    of the gathered tensor).
    """
    check_layout(layout)
    if topology.sequence_size == 1:
        return x_local
    if not dist.is_initialized():
        raise ValueError("unshard_sequence over several ranks needs an initialised process group")
    return _Unshard.apply(x_local, topology, layout, dim % x_local.dim())


# ------------------------------------------------------------------------- causal block schedule
@dataclass(frozen=True)
class Block:
    """Query rows [q_start, q_end) meet key rows [k_start, k_end), with a top-left causal mask or not."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool


def ring_step_blocks(
    layout: str, causal: bool, ring_rank: int, source_rank: int, block_len: int
) -> list[Block]:
    """The attention a ring rank computes when it holds the key block of ``source_rank``.

    Returns an empty list when the whole block is masked (the K/V are still passed on).
    """
    full = Block(0, block_len, 0, block_len, False)
    if not causal:
        return [full]
    diagonal = Block(0, block_len, 0, block_len, True)
    if layout == "contiguous":
        if source_rank == ring_rank:
            return [diagonal]
        return [full] if source_rank < ring_rank else []
    if layout == "zigzag":
        half = block_len // 2
        if source_rank == ring_rank:
            # chunk r precedes chunk 2R-1-r, so one top-left causal mask covers the whole block
            return [diagonal]
        if source_rank < ring_rank:
            # both query chunks follow the source's first chunk and precede its second
            return [Block(0, block_len, 0, half, False)]
        # only our second chunk follows the source's chunks, and it follows both entirely
        return [Block(half, block_len, 0, block_len, False)]
    if layout == "stripe":
        if source_rank <= ring_rank:
            return [diagonal]
        # query R·i + r sees key R·j + src only for j < i: strictly below the diagonal
        return [Block(1, block_len, 0, block_len - 1, True)] if block_len > 1 else []
    check_layout(layout)
    return []

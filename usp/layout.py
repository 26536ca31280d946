"""Layouts: which global token positions each rank holds; padding for lengths that do not split.

A layout maps the global sequence onto the ring's ``R`` blocks; the ring block of ring rank ``r``
is then cut into ``U`` contiguous pieces, piece ``u`` to Ulysses rank ``u`` (the Ulysses
all-to-all concatenates the pieces back in Ulysses-rank order, giving the ring its block).

- ``contiguous``: block r = tokens [r·L, (r+1)·L), L = S/R. Causal work is imbalanced.
- ``zigzag``: the sequence in 2R chunks of c = S/2R; block r = chunk r ‖ chunk 2R−1−r.
- ``stripe``: block r = tokens r, r+R, r+2R, … (token t goes to ring rank t mod R).

Tokens, labels and RoPE positions must all be permuted the same way: use
:func:`shard_sequence` for the tensors and :func:`sequence_positions` for the positions.

A length the layout cannot split evenly is padded to :func:`padded_length` slots; the slots past
the real length hold no token: :func:`shard_sequence` fills them, :func:`usp.usp_attention` masks
them (``seq_len=``), the loss ignores them, and :func:`unshard_sequence` drops them.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from usp.choices import LAYOUTS
from usp.comm import all_gather_stacked
from usp.topology import Topology

Tensor = torch.Tensor


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def slot_multiple(ring: int, ulysses: int, layout: str) -> int:
    """The number of slots a sequence is padded to a multiple of: ``ring x ulysses``, and for
    zigzag an even number of slots per ring block (its two chunks)."""
    check_layout(layout)
    multiple = ring * ulysses
    if layout == "zigzag" and ulysses % 2:
        multiple *= 2
    return multiple


def padded_length(seq_len: int, ring: int, ulysses: int, layout: str) -> int:
    """The slots ``layout`` splits a ``seq_len``-token sequence into (``>= seq_len``): the
    slots past ``seq_len`` hold no token and are masked out of attention and loss."""
    if seq_len < 1:
        raise ValueError(f"sequence length {seq_len} must be at least 1")
    multiple = slot_multiple(ring, ulysses, layout)
    return -(-seq_len // multiple) * multiple


def check_tp_split(seq_len: int, ring: int, ulysses: int, tp: int, layout: str) -> None:
    """ValueError unless ``tp`` ranks can split each sequence rank's slots (any ``seq_len``
    trains: the layout pads it to its slots, masked)."""
    local_len = padded_length(seq_len, ring, ulysses, layout) // (ring * ulysses)
    if local_len % tp != 0:
        raise ValueError(
            f"--seq-len={seq_len} leaves {local_len} slots per sequence rank, which tp={tp} "
            f"cannot split; use a multiple of {ring * ulysses * tp * 2}"
        )


def check_ring_layout(ring_layout: str | None, slots: int, ring: int) -> None:
    """ValueError unless ring attention can run on ``ring_layout`` (None: the shards' own
    layout) over ``ring`` blocks of ``slots`` slots in all: zigzag cuts each block in halves."""
    if ring_layout is None:
        return
    check_layout(ring_layout)
    if ring_layout == "zigzag" and ring > 1 and (slots // ring) % 2:
        raise ValueError(
            f"ring_layout='zigzag' cuts each ring block of {slots // ring} slots ({slots} over "
            f"ring={ring}) into two halves, so it must be even; pad the sequence to a multiple "
            f"of {2 * ring} slots, or use ring_layout='stripe'")


def check_sequence_length(seq_len: int, ring: int, ulysses: int, layout: str) -> None:
    """Raise ValueError unless ``layout`` splits ``seq_len`` slots over ring × ulysses evenly
    (shards from :func:`shard_sequence` always do: it pads)."""
    multiple = slot_multiple(ring, ulysses, layout)
    if seq_len % multiple != 0:
        raise ValueError(
            f"sequence length {seq_len} cannot be split by layout {layout!r} over ring={ring} x "
            f"ulysses={ulysses}: it must be a multiple of {multiple}; shard_sequence pads it to "
            f"{-(-seq_len // multiple) * multiple} (pass seq_len={seq_len} to usp_attention)"
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
    """Global positions of the slots held by the rank at (ring_rank, ulysses_rank); positions
    ``>= seq_len`` are the padding slots of an uneven length."""
    slots = padded_length(seq_len, ring, ulysses, layout)
    piece = slots // (ring * ulysses)
    block = ring_block_positions(slots, ring, ring_rank, layout)
    return block[ulysses_rank * piece : (ulysses_rank + 1) * piece]


def sequence_positions(seq_len: int, topology: Topology, layout: str = "zigzag") -> Tensor:
    """LongTensor ``[S_local]``: the global positions of this rank's slots (for RoPE and labels);
    for a length the layout cannot split evenly, the last slots (positions ``>= seq_len``) are
    padding."""
    return shard_positions(
        seq_len, topology.ring_size, topology.ulysses_size, topology.ring_rank,
        topology.ulysses_rank, layout,
    )


def shard_sequence(x: Tensor, topology: Topology, layout: str = "zigzag", dim: int = 1,
                   fill: float = 0) -> Tensor:
    """This rank's shard ``[.., S_local, ..]`` of a global tensor ``[.., S, ..]`` (along ``dim``).

    A length the layout cannot split evenly is padded with ``fill`` first (use -100 for labels);
    pass ``seq_len=S`` to :func:`usp.usp_attention` so the padding is masked."""
    dim = dim % x.dim()
    seq_len = x.shape[dim]
    slots = padded_length(seq_len, topology.ring_size, topology.ulysses_size, layout)
    if slots > seq_len:
        pad_shape = list(x.shape)
        pad_shape[dim] = slots - seq_len
        x = torch.cat([x, x.new_full(pad_shape, fill)], dim=dim)
    positions = sequence_positions(seq_len, topology, layout).to(x.device)
    if layout == "contiguous":
        return x.narrow(dim, int(positions[0]), positions.numel())
    return x.index_select(dim, positions)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, topology, layout, dim, seq_len):
        ring, ulysses = topology.ring_size, topology.ulysses_size
        slots = x_local.shape[dim] * ring * ulysses
        stacked = all_gather_stacked(x_local, topology.sequence_group)  # [G, .., S_local, ..]
        positions = torch.cat([
            shard_positions(slots, ring, ulysses, index // ulysses, index % ulysses, layout)
            for index in topology.sequence_index_of_group_rank
        ]).to(x_local.device)
        gathered = stacked.movedim(0, dim).flatten(dim, dim + 1)  # [.., G*S_local, ..]
        out = torch.empty_like(gathered).index_copy_(dim, positions, gathered)
        ctx.dim, ctx.slots = dim, slots
        ctx.own = sequence_positions(slots, topology, layout).to(x_local.device)
        return out.narrow(dim, 0, seq_len)  # the padding slots of an uneven length dropped

    @staticmethod
    def backward(ctx, grad):
        # the gathered tensor is replicated over the sequence group: each rank keeps its slice
        # (zero for its padding slots)
        extra = list(grad.shape)
        extra[ctx.dim] = ctx.slots - grad.shape[ctx.dim]
        grad = torch.cat([grad, grad.new_zeros(extra)], dim=ctx.dim)
        return grad.index_select(ctx.dim, ctx.own), None, None, None, None


def unshard_sequence(
    x_local: Tensor, topology: Topology, layout: str = "zigzag", dim: int = 1,
    seq_len: int | None = None,
) -> Tensor:
    """Gather every rank's shard back into global order ``[.., S, ..]`` on every rank, the
    padding slots of an uneven length ``seq_len`` dropped (None: every slot is a token).

    Differentiable: the result is treated as replicated over the sequence group, so the backward
    hands each rank its own slice of the gradient (right when all ranks compute the same function
    of the gathered tensor).
    """
    check_layout(layout)
    dim = dim % x_local.dim()
    slots = x_local.shape[dim] * topology.sequence_size
    seq_len = slots if seq_len is None else seq_len
    if not 0 < seq_len <= slots or padded_length(
            seq_len, topology.ring_size, topology.ulysses_size, layout) != slots:
        raise ValueError(
            f"seq_len={seq_len} does not fit {slots} slots ({x_local.shape[dim]} per rank x "
            f"{topology.sequence_size} ranks) under layout {layout!r}"
        )
    if topology.sequence_size == 1:
        return x_local.narrow(dim, 0, seq_len)
    if not dist.is_initialized():
        raise ValueError("unshard_sequence over several ranks needs an initialised process group")
    return _Unshard.apply(x_local, topology, layout, dim, seq_len)

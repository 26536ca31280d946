"""The short causal depthwise convolution in front of a scan, on a sequence split in contiguous
shards: each rank needs the last ``K - 1`` tokens of the previous shard (the halo).

Output ``t`` of channel ``c`` is ``bias_c + Σ_{j<K} w[c, j] x[t - (K-1) + j, c]`` (PyTorch's
``conv1d`` with ``K - 1`` zeros in front, as Mamba-2 and Qwen3-Next run it), and with packed
documents a tap that reaches into another document reads zero (as the fused ``causal_conv1d``
does with ``seq_idx``). The halo travels from shard ``i`` to shard ``i + 1`` of the sequence
group (``ring_rank · U + ulysses_rank``) in one message of ``(K-1) · C`` elements, and its
gradient travels back in the backward; the first shard reads zeros.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from usp.comm import nbytes, record
from usp.topology import Topology

Tensor = torch.Tensor
HALO_TAG, HALO_GRAD_TAG = 13, 14
ACTIVATIONS = (None, "silu", "swish")


class Neighbours:
    """The previous and next shards of this rank's in the sequence group (global ranks)."""

    def __init__(self, topology: Topology) -> None:
        group = topology.sequence_group
        index = topology.sequence_rank
        group_rank_of = {shard: rank for rank, shard in
                         enumerate(topology.sequence_index_of_group_rank)}
        self.group, self.index, self.count = group, index, topology.sequence_size
        self.previous = (dist.get_global_rank(group, group_rank_of[index - 1])
                         if index > 0 else None)
        self.next = (dist.get_global_rank(group, group_rank_of[index + 1])
                     if index + 1 < self.count else None)

    def exchange(self, send: Tensor, to: int | None, recv: Tensor, source: int | None,
                 tag: int) -> None:
        ops = []
        if to is not None:
            record("p2p", nbytes(send))
            ops.append(dist.P2POp(dist.isend, send, to, self.group, tag))
        if source is not None:
            ops.append(dist.P2POp(dist.irecv, recv, source, self.group, tag))
        if ops:
            with record_function("usp::scan.halo"):
                for work in dist.batch_isend_irecv(ops):
                    work.wait()


class _Halo(torch.autograd.Function):
    """tail ``[B, K-1, C]`` (this shard's last tokens) -> the previous shard's tail."""

    @staticmethod
    def forward(ctx, tail, neighbours: Neighbours):
        tail = tail.contiguous()
        halo = torch.zeros_like(tail)  # the first shard reads zeros
        neighbours.exchange(tail, neighbours.next, halo, neighbours.previous, HALO_TAG)
        ctx.neighbours = neighbours
        return halo

    @staticmethod
    def backward(ctx, grad_halo):
        neighbours = ctx.neighbours
        grad_tail = torch.zeros_like(grad_halo)  # the last shard's tail feeds no one
        neighbours.exchange(grad_halo.contiguous(), neighbours.previous, grad_tail,
                            neighbours.next, HALO_GRAD_TAG)
        return grad_tail, None


def activate(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    return F.silu(x)


def depthwise_causal(extended: Tensor, weight: Tensor, bias: Tensor | None, length: int,
                     same_segment: Tensor | None) -> Tensor:
    """``extended`` ``[B, K-1+L, C]`` (halo then tokens) -> ``[B, L, C]``. ``same_segment``
    ``[rows, K, L]``: tap ``j`` of output ``t`` reads a token of ``t``'s own segment."""
    taps = weight.shape[1]
    if same_segment is None:
        out = F.conv1d(extended.transpose(1, 2), weight[:, None, :], bias,
                       groups=weight.shape[0])  # [B, C, L]
        return out.transpose(1, 2)
    out = extended[:, taps - 1:] * weight[:, taps - 1]  # the token itself
    for tap in range(taps - 1):
        window = extended[:, tap:tap + length] * same_segment[:, tap, :, None]
        out = out + window * weight[:, tap]
    return out if bias is None else out + bias


def same_segment_taps(segments: Tensor, start: int, length: int, taps: int) -> Tensor:
    """``[rows, K, L]``: for output ``t`` (global position ``start + t``) and tap ``j``, whether
    the token it reads (position ``start + t - (K-1) + j``) is in the same segment."""
    positions = torch.arange(start, start + length)
    reads = positions[None, :] - (taps - 1) + torch.arange(taps)[:, None]  # [K, L]
    own = segments[:, positions]  # [rows, L]
    read = segments[:, reads.clamp(min=0)]  # [rows, K, L]
    return (read == own[:, None, :]) & (reads >= 0)


def halo_conv(x: Tensor, weight: Tensor, bias: Tensor | None, topology: Topology,
              segments: Tensor | None, activation: str | None) -> Tensor:
    """x ``[B, S_RU, C]`` (this rank's contiguous shard), weight ``[C, K]`` -> ``[B, S_RU, C]``;
    ``segments`` ``[rows, S]`` of the global sequence or None. Checked by the caller."""
    taps, length = weight.shape[1], x.shape[1]
    dtype = weight.dtype
    tokens = x.to(dtype)
    if taps == 1:
        halo = tokens[:, :0]
    elif topology.sequence_size == 1:
        halo = tokens.new_zeros(x.shape[0], taps - 1, x.shape[2])
    else:
        halo = _Halo.apply(tokens[:, length - (taps - 1):], Neighbours(topology))
    same = None
    if segments is not None:
        start = topology.sequence_rank * length
        same = same_segment_taps(segments, start, length, taps).to(device=x.device, dtype=dtype)
    out = depthwise_causal(torch.cat([halo, tokens], dim=1), weight, bias, length, same)
    return activate(out, activation).to(x.dtype)

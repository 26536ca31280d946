"""causal_conv: the short causal depthwise convolution in front of a scan, on a sequence split in
contiguous shards; each rank needs the last ``K - 1`` tokens of the previous shard (the halo).

Output ``t`` of channel ``c`` is ``bias_c + Σ_{j<K} w[c, j] x[c, t - (K-1) + j]`` (PyTorch's
``conv1d`` with ``K - 1`` zeros in front: transformers' ``causal_conv1d_fn`` for Mamba-2 and
Qwen3-Next), and with packed documents a tap that reaches into another document reads zero (as
the fused ``causal_conv1d`` does with ``seq_idx``). The halo travels from shard ``i`` to shard
``i + 1`` of the sequence group (shard index ``ring_rank · U + ulysses_rank``) in one message of
``B · C · (K-1)`` elements, and its gradient travels back in the backward; the first shard reads
zeros. No all-to-all: the convolution is per channel, every rank keeps all its channels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from usp.comm import nbytes, record
from usp.scan.calls import check_scan_layout, check_tensor, describe, digest, sequence_segments
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
        self.group = group
        self.previous = (dist.get_global_rank(group, group_rank_of[index - 1])
                         if index > 0 else None)
        self.next = (dist.get_global_rank(group, group_rank_of[index + 1])
                     if index + 1 < topology.sequence_size else None)

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
    """tail ``[B, C, K-1]`` (this shard's last tokens) -> the previous shard's tail."""

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


def same_segment_taps(segments: Tensor, start: int, length: int, taps: int) -> Tensor:
    """``[rows, K, L]``: for output ``t`` (global position ``start + t``) and tap ``j``, whether
    the token it reads (position ``start + t - (K-1) + j``) is in the same segment."""
    positions = torch.arange(start, start + length)
    reads = positions[None, :] - (taps - 1) + torch.arange(taps)[:, None]  # [K, L]
    own = segments[:, positions]  # [rows, L]
    read = segments[:, reads.clamp(min=0)]  # [rows, K, L]
    return (read == own[:, None, :]) & (reads >= 0)


def depthwise_causal(extended: Tensor, weight: Tensor, bias: Tensor | None,
                     same_segment: Tensor | None) -> Tensor:
    """``extended`` ``[B, C, K-1+L]`` (halo then tokens) -> ``[B, C, L]``. ``same_segment``
    ``[rows, K, L]``: tap ``j`` of output ``t`` reads a token of ``t``'s own segment."""
    if same_segment is None:
        return F.conv1d(extended, weight[:, None, :], bias, groups=weight.shape[0])
    taps, length = weight.shape[1], same_segment.shape[-1]
    out = None
    for tap in range(taps):  # K is small (4): one masked multiply-add per tap
        term = extended[..., tap:tap + length] * weight[:, tap, None] \
            * same_segment[:, None, tap, :]
        out = term if out is None else out + term
    return out if bias is None else out + bias[:, None]


def _check(x, weight, bias, topology: Topology, layout: str, activation) -> None:
    check_scan_layout(layout, topology)
    check_tensor("x", x, 3, "[B, C, S_local]")
    check_tensor("weight", weight, 2, "[C, K]")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} [C, K] does not match x "
                         f"{tuple(x.shape)} [B, C, S_local]: C={weight.shape[0]} != {x.shape[1]}")
    if bias is not None:
        check_tensor("bias", bias, 1, "[C]")
        if bias.shape[0] != x.shape[1]:
            raise ValueError(f"bias {tuple(bias.shape)} must be [C] = [{x.shape[1]}]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS}")
    halo, length = weight.shape[1] - 1, x.shape[2]
    if topology.sequence_size > 1 and length < halo:
        raise ValueError(
            f"each rank holds {length} tokens but a kernel of {weight.shape[1]} taps reads "
            f"{halo} tokens of the previous rank; use a sequence of at least "
            f"{halo * topology.sequence_size} slots over {topology.sequence_size} ranks")


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, topology: Topology, *,
                activation: str | None = None, layout: str = "contiguous", documents=None,
                cu_seqlens=None, seq_len: int | None = None) -> Tensor:
    """The causal depthwise convolution of a sequence split over ring × ulysses ranks.

    x ``[B, C, S_RU]`` (this rank's contiguous shard, channels first as transformers'
    ``causal_conv1d_fn`` takes it), weight ``[C, K]``, bias ``[C]`` or None; returns
    ``[B, C, S_RU]`` in x's dtype, computed in weight's dtype (as transformers does), with
    ``activation`` (``"silu"``/``"swish"``) applied. ``documents`` / ``cu_seqlens`` / ``seq_len``
    describe the global sequence as for :func:`usp.usp_attention`: a tap never reads across a
    document boundary. Differentiable; bad input raises the same ValueError on every rank of the
    sequence group before any collective.
    """
    error, segments = None, None
    try:
        _check(x, weight, bias, topology, layout, activation)
        segments = sequence_segments(
            x.shape[2], x.shape[0], topology, layout, documents=documents,
            cu_seqlens=cu_seqlens, seq_len=seq_len)
    except Exception as exc:  # any failure before a collective reaches every rank, as one error
        error = exc
    topology.agree_on_call(describe({"x": x, "weight": weight, "bias": bias}, layout=layout,
                                    activation=activation, documents=digest(segments)), error)
    taps, length = weight.shape[1], x.shape[2]
    tokens = x.to(weight.dtype)
    if topology.sequence_size == 1 or taps == 1:
        halo = tokens.new_zeros(x.shape[0], x.shape[1], taps - 1)
    else:
        halo = _Halo.apply(tokens[..., length - (taps - 1):], Neighbours(topology))
    same = None
    if segments is not None:
        start = topology.sequence_rank * length
        same = same_segment_taps(segments, start, length, taps).to(x.device, weight.dtype)
    out = depthwise_causal(torch.cat([halo, tokens], dim=-1), weight, bias, same)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)

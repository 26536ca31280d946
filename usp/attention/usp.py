"""usp_attention: Ulysses inside each row of the sequence grid, ring attention across rows.

``ring_attention`` (ulysses = 1) and ``ulysses_attention`` (ring = 1) are the two corner cases of
the same path. All three validate their inputs before any collective, so bad input raises the
same ValueError on every rank instead of hanging one of them.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from usp.attention.kernels import Kernel, default_scale, resolve_kernel
from usp.attention.ring import ring_attention_on_group
from usp.attention.ulysses import kv_replication, ulysses_around
from usp.layout import check_layout, check_sequence_length
from usp.topology import Topology

Tensor = torch.Tensor


def check_inputs(q: Tensor, k: Tensor, v: Tensor, topology: Topology, layout: str) -> None:
    """Raise ValueError, naming the numbers, for anything usp_attention cannot do exactly."""
    check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S_local, H, D]; got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    (batch, seq, n_q, dim), (kb, ks, n_kv, kd) = q.shape, k.shape
    if (batch, seq, dim) != (kb, ks, kd):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, local sequence "
            f"length and head dim ([B, S_local, H, D])"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them alike")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not q.is_floating_point():
        raise ValueError(f"attention needs floating-point tensors, got {q.dtype}")
    if n_q % n_kv != 0:
        raise ValueError(f"n_q_heads={n_q} is not a multiple of n_kv_heads={n_kv} (GQA needs it)")
    ring, ulysses = topology.ring_size, topology.ulysses_size
    if ulysses > 1:
        kv_replication(n_q, n_kv, ulysses)
    check_sequence_length(seq * ring * ulysses, ring, ulysses, layout)


def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    topology: Topology,
    *,
    causal: bool = False,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    kernel: "str | Kernel" = "auto",
) -> Tensor:
    """Attention over a sequence sharded on ring × ulysses ranks.

    q: [B, S_RU, Hq, D], k/v: [B, S_RU, Hkv, D], local shards in ``layout`` (see
    :func:`usp.shard_sequence`). Returns [B, S_RU, Hq, D] in q's dtype. ``Hq % Hkv == 0``; the
    Ulysses degree must divide Hq, and Hkv and ulysses must divide one another. Differentiable.
    """
    check_inputs(q, k, v, topology, layout)
    chosen = resolve_kernel(kernel, q)
    scale = default_scale(q.shape[-1], softmax_scale)
    ring_group = topology.ring_group if topology.ring_size > 1 else None
    ring = partial(ring_attention_on_group, group=ring_group, layout=layout, causal=causal,
                   scale=scale, kernel=chosen)
    if topology.ulysses_size == 1:
        return ring(q, k, v)  # [B, S_R, Hq, D]
    return ulysses_around(q, k, v, topology.ulysses_group, ring)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, topology: Topology, **options) -> Tensor:
    """Pure ring attention: the topology's sequence parallelism must be all ring (ulysses = 1)."""
    if topology.ulysses_size != 1:
        raise ValueError(
            f"ring_attention needs ulysses=1, the topology has ulysses={topology.ulysses_size}; "
            f"use usp_attention for a ring x ulysses grid"
        )
    return usp_attention(q, k, v, topology, **options)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, topology: Topology, **options) -> Tensor:
    """Pure Ulysses attention: the topology's sequence parallelism must be all Ulysses (ring = 1)."""
    if topology.ring_size != 1:
        raise ValueError(
            f"ulysses_attention needs ring=1, the topology has ring={topology.ring_size}; "
            f"use usp_attention for a ring x ulysses grid"
        )
    return usp_attention(q, k, v, topology, **options)


class USPAttention(nn.Module):
    """``usp_attention`` as a module: holds the topology and options, takes [B, S_local, H, D]."""

    def __init__(
        self,
        topology: Topology,
        *,
        causal: bool = False,
        layout: str = "zigzag",
        softmax_scale: float | None = None,
        kernel: "str | Kernel" = "auto",
    ) -> None:
        super().__init__()
        check_layout(layout)
        self.topology, self.causal, self.layout = topology, causal, layout
        self.softmax_scale, self.kernel = softmax_scale, kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return usp_attention(q, k, v, self.topology, causal=self.causal, layout=self.layout,
                             softmax_scale=self.softmax_scale, kernel=self.kernel)

    def extra_repr(self) -> str:
        return f"{self.topology}, causal={self.causal}, layout={self.layout!r}, kernel={self.kernel!r}"

"""usp_attention: Ulysses inside each row of the sequence grid, ring attention across rows.

``ring_attention`` (ulysses = 1) and ``ulysses_attention`` (ring = 1) are the two corner cases of
the same path. All three validate their inputs and agree on them over the sequence group before
any collective, so bad input raises the same ValueError on every rank instead of hanging one.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from usp.attention.kernels import Kernel, default_scale, resolve_kernel
from usp.attention.call_mask import call_mask
from usp.attention.heads import heads_of
from usp.attention.relayout import relayout
from usp.attention.ring import ring_attention_on_group
from usp.attention.ulysses import ulysses_around
from usp.layout import check_layout, check_ring_layout, check_sequence_length
from usp.mask import AttentionMask
from usp.schedule import schedule_for
from usp.topology import Topology

Tensor = torch.Tensor


def check_inputs(q: Tensor, k: Tensor, v: Tensor, topology: Topology, layout: str,
                 softmax_scale: float | None = None) -> None:
    """Raise ValueError, naming the numbers, for anything usp_attention cannot do exactly."""
    check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor [B, S_local, H, D]; got {shape}")
        if 0 in t.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} [B, S_local, H, D] with an empty dimension; "
                "every rank needs at least one token, head and head-dim element"
            )
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
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale={softmax_scale} must be a finite number (or None)")
    if n_q % n_kv != 0:
        raise ValueError(f"n_q_heads={n_q} is not a multiple of n_kv_heads={n_kv} (GQA needs it)")
    ring, ulysses = topology.ring_size, topology.ulysses_size
    check_sequence_length(seq * ring * ulysses, ring, ulysses, layout)


def _check_collective_device(q: Tensor, topology: Topology) -> None:
    """NCCL sends from the current CUDA device: tensors elsewhere hang or fail inside NCCL."""
    if q.device.type != "cuda" or topology.sequence_size == 1:
        return
    group = topology.ring_group if topology.ring_size > 1 else topology.ulysses_group
    if "nccl" in str(dist.get_backend(group)) and q.device.index != torch.cuda.current_device():
        raise ValueError(
            f"the tensors are on {q.device} but this rank's current CUDA device is "
            f"cuda:{torch.cuda.current_device()}; NCCL needs them equal: call "
            "torch.cuda.set_device(local_rank) before the first collective"
        )


def _describe(q, k, v, mask, layout, softmax_scale, kernel, head_chunks) -> dict:
    """What every rank of a sequence group must pass alike (agreed before the first collective)."""
    shape = lambda t: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__  # noqa: E731
    return {
        "shapes": tuple(shape(t) for t in (q, k, v)),
        "dtypes": tuple(str(getattr(t, "dtype", None)) for t in (q, k, v)),
        # the device type, not the index: each rank has its own GPU
        "devices": tuple(str(getattr(getattr(t, "device", None), "type", None)) for t in (q, k, v)),
        "causal": getattr(mask, "causal", None), "window": getattr(mask, "window", None),
        "documents": mask.documents_digest() if isinstance(mask, AttentionMask) else None,
        "layout": layout, "softmax_scale": softmax_scale,
        "kernel": kernel.name if isinstance(kernel, Kernel) else kernel,
        "head_chunks": head_chunks,
    }


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # every kernel reads rows of D contiguous elements; a strided head dim (x[..., ::2]) is copied
    return t if t.stride(-1) == 1 else t.contiguous()


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
    window: tuple[int, int] | None = None,
    documents: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    padding_mask: Tensor | None = None,
    seq_len: int | None = None,
    mask: AttentionMask | None = None,
    head_chunks: int = 1,
    sinks: Tensor | None = None,
    ring_layout: str | None = None,
) -> Tensor:
    """Attention over a sequence sharded on ring × ulysses ranks.

    q: [B, S_RU, Hq, D], k/v: [B, S_RU, Hkv, D], local shards in ``layout`` (see
    :func:`usp.shard_sequence`). Returns [B, S_RU, Hq, D] in q's dtype. ``Hq % Hkv == 0``; head
    counts Ulysses cannot split evenly run on zero-padded heads (exact). Differentiable.

    Masks describe the **global** sequence and are the same on every rank:

    - ``window=(left, right)``: query i sees keys i-left .. i+right (-1: unbounded; flash-attn's
      convention; with ``causal`` the right side is 0);
    - ``documents`` ([S] or [B, S], a document id per position, -1 for no token) or flash-attn's
      ``cu_seqlens``: packed documents, attention stays inside each;
    - ``padding_mask`` ([B, S], true for tokens, as Hugging Face passes it): padding attends to
      nothing and is seen by nothing (its output and gradients are zero);
    - ``seq_len``: the real length when :func:`usp.shard_sequence` padded an uneven one;
    - or ``mask``, an :class:`usp.AttentionMask` built once (then none of the above).

    ``sinks`` [Hq]: attention sinks (GPT-OSS's ``s_aux``), a learned logit per query head in
    every row's softmax denominator that carries no value; exact on every path, and its
    gradient on each rank is that rank's part (they sum over the ranks, as FSDP sums).

    ``ring_layout`` (ring > 1): the layout the ring runs on when it is not ``layout``'s: after
    the Ulysses all-to-all one all-to-all over the ring group re-lays each ring block's q, k and
    v (and the output back), so a ``contiguous`` sequence — what a scan layer needs — meets
    causal attention balanced (``"zigzag"``, or ``"stripe"``). The result is the same
    (:mod:`usp.attention.relayout`).

    ``head_chunks`` (Ulysses): each rank's heads run in up to this many chunks of whole kv
    groups, every chunk's all-to-alls travelling while another chunk's attention computes
    (:mod:`usp.attention.ulysses_overlap`); 1: one all-to-all each way. The result is the same.

    Before the first collective the ranks of the sequence group agree on the call (shapes,
    dtype, flags, mask): bad input on any rank (any exception its checks raise), or ranks that
    disagree, raise the same ValueError on every rank. This costs one tiny all-gather on the
    host per call. The mask is built once per batch: pass the same ``documents`` /
    ``cu_seqlens`` / ``padding_mask`` tensors to every layer (:mod:`usp.attention.call_mask`).
    """
    error, chosen = None, None
    try:
        check_inputs(q, k, v, topology, layout, softmax_scale)
        mask = call_mask(q, topology, layout, mask, causal, window, documents, cu_seqlens,
                         padding_mask, seq_len)
        _check_collective_device(q, topology)
        chosen = resolve_kernel(kernel, q)
        if not isinstance(head_chunks, int) or head_chunks < 1:
            raise ValueError(f"head_chunks={head_chunks!r} must be an integer >= 1")
        _check_sinks(sinks, q)
        check_ring_layout(ring_layout, q.shape[1] * topology.sequence_size, topology.ring_size)
    except Exception as exc:  # any failure before a collective reaches every rank, as one error
        error = exc
    description = _describe(q, k, v, mask, layout, softmax_scale, kernel, head_chunks)
    description["sinks"] = tuple(sinks.shape) if isinstance(sinks, Tensor) else sinks
    description["ring_layout"] = ring_layout
    topology.agree_on_call(description, error)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    scale = default_scale(q.shape[-1], softmax_scale)
    ring_group = topology.ring_group if topology.ring_size > 1 else None
    runs_on = ring_layout if ring_group is not None and ring_layout is not None else layout
    schedule = schedule_for(mask, runs_on, topology.ring_size)
    ring = partial(ring_attention_on_group, group=ring_group, schedule=schedule, scale=scale,
                   kernel=chosen)
    if runs_on != layout:
        ring = partial(_relaid, ring, group=ring_group, layout=layout, ring_layout=runs_on)
    if topology.ulysses_size == 1:
        return ring(q, k, v, sinks=sinks)  # [B, S_R, Hq, D]

    def inner(q_slots: Tensor, k_slots: Tensor, v_slots: Tensor, heads: tuple[int, ...]):
        # the sinks of the heads in this rank's slots: [Hq] -> [slots]
        return ring(q_slots, k_slots, v_slots,
                    sinks=None if sinks is None else heads_of(sinks, heads))

    return ulysses_around(q, k, v, topology.ulysses_group, inner, chunks=head_chunks)


def _relaid(ring, q: Tensor, k: Tensor, v: Tensor, *, group, layout: str, ring_layout: str,
            sinks: Tensor | None = None) -> Tensor:
    """``ring`` on the ring blocks re-laid from ``layout`` into ``ring_layout``, its output laid
    back."""
    q, k, v = (relayout(t, group, layout, ring_layout) for t in (q, k, v))
    return relayout(ring(q, k, v, sinks=sinks), group, ring_layout, layout)


def _check_sinks(sinks, q: Tensor) -> None:
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or sinks.dim() != 1 or sinks.shape[0] != q.shape[2]:
        shape = tuple(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be a tensor [Hq] = [{q.shape[2]}] (one logit per query "
                         f"head); got {shape}")
    if not sinks.is_floating_point() or sinks.device != q.device:
        raise ValueError(f"sinks must be floating point on {q.device}; got {sinks.dtype} on "
                         f"{sinks.device}")


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

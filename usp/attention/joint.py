"""Joint attention of diffusion transformers: every query over [text; image], image sharded.

MMDiT models (SD3, Flux) run one non-causal attention over the concatenation of a short text
sequence and a long image sequence. Here the image tokens are sharded over the sequence group
(ring × ulysses, contiguous shards in ``sequence_rank`` order) and the text tokens are replicated
on every rank. The text never travels through the Ulysses all-to-all: after it, a rank holds all
image tokens of its head group, and it takes the same heads of the replicated text locally. The
ring then needs each text token on exactly one ring rank (text K/V counted once): ring rank ``r``
takes ``T = ceil(S_txt / R)`` text slots, the first ``R·T - S_txt`` ranks one of them an empty
pad. Under the stripe layout a ring rank's local row ``i`` is global position ``i·R + r``, so the
pads (local row 0 of ranks ``r < R·T - S_txt``) are the global positions ``0 .. R·T - S_txt - 1``:
a prefix, which the documents mask (-1 = no token) hides exactly from every query. The order of
text and image in the sequence does not matter to non-causal attention; the two outputs come back
apart, and the caller places them (Flux puts the text first, SD3 last).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist

from usp.attention.kernels import Kernel, default_scale, resolve_kernel
from usp.attention.ring import ring_attention_on_group
from usp.attention.heads import HeadPlan, by_destination, head_plan, index_on, real_heads
from usp.attention.ulysses import ulysses_around
from usp.attention.usp import _check_collective_device, check_inputs
from usp.comm import all_gather_stacked, exchange_all_to_all
from usp.mask import NOT_A_TOKEN, AttentionMask
from usp.schedule import schedule_for
from usp.topology import Topology

Tensor = torch.Tensor


def joint_attention(q: Tensor, k: Tensor, v: Tensor, text_q: Tensor, text_k: Tensor,
                    text_v: Tensor, topology: Topology, *, softmax_scale: float | None = None,
                    kernel: "str | Kernel" = "auto") -> tuple[Tensor, Tensor]:
    """Non-causal attention of image and text queries over all text and image keys.

    q: [B, S_RU, Hq, D], k/v: [B, S_RU, Hkv, D], this rank's contiguous shard of the image tokens
    (shard ``topology.sequence_rank``, the same length on every rank); text_q: [B, S_txt, Hq, D],
    text_k/text_v: [B, S_txt, Hkv, D], identical on every rank of the sequence group (not
    checked: pass the same values). Returns ``(out_image [B, S_RU, Hq, D], out_text
    [B, S_txt, Hq, D])``, out_text identical on every rank; equal to single-process attention
    over ``cat([text, image])`` (or ``cat([image, text])``: for non-causal attention the order
    changes nothing but where the rows sit).

    Gradient contract (what :func:`usp.parallelize` and FSDP2 expect: sum gradients over ranks):
    the gradient of ``out_image`` is this rank's shard of the true gradient, and the true
    gradient of ``out_text`` is the **sum over the sequence group** of what each rank passes
    (every rank's loss term counts; a loss computed identically on every rank must be divided by
    ``topology.sequence_size`` or computed on one rank). Then q/k/v get the exact gradient of this
    rank's shard, and text_q/k/v get partial gradients whose sum over the sequence group is exact
    (each rank's part holds the rows and heads it computed, zero elsewhere).

    Bad input on any rank, or ranks that disagree on shapes, dtypes or options, raise the same
    ValueError on every rank before any collective (see :func:`usp.usp_attention`).
    """
    error, chosen = None, None
    try:
        check_inputs(q, k, v, topology, "contiguous", softmax_scale)
        _check_text(q, k, text_q, text_k, text_v)
        _check_collective_device(q, topology)
        chosen = resolve_kernel(kernel, q)
    except Exception as exc:  # any failure before a collective reaches every rank, as one error
        error = exc
    topology.agree_on_call(_describe(q, k, v, text_q, text_k, text_v, softmax_scale, kernel),
                           error)
    scale = default_scale(q.shape[-1], softmax_scale)
    ring_size, ulysses = topology.ring_size, topology.ulysses_size
    plan = head_plan(q.shape[2], k.shape[2], ulysses)
    text = _local_text((text_q, text_k, text_v), topology, plan)  # [B, T, h, D] each
    slots, pads = text[0].shape[1], ring_size * text[0].shape[1] - text_q.shape[1]
    text_out = []

    def inner(q_heads: Tensor, k_heads: Tensor, v_heads: Tensor, heads=None) -> Tensor:
        # [B, S_R, h, D] image ring block ++ [B, T, h, D] text slots -> [B, T + S_R, h, D]
        joint = [torch.cat([t, x], dim=1) for t, x in zip(text, (q_heads, k_heads, v_heads))]
        mask = joint_mask(joint[0].shape[1] * ring_size, pads)
        ring_group = topology.ring_group if ring_size > 1 else None
        out = ring_attention_on_group(*joint, group=ring_group, scale=scale, kernel=chosen,
                                      schedule=schedule_for(mask, "stripe", ring_size))
        text_out.append(out[:, :slots])  # [B, T, h, D], a pad row's output is 0
        return out[:, slots:]  # [B, S_R, h, D]

    if ulysses == 1:
        out_image = inner(q, k, v)
    else:
        out_image = ulysses_around(q, k, v, topology.ulysses_group, inner)
    return out_image, _assemble_text(text_out[0], topology, plan, text_q.shape[1])


def text_rows(text_len: int, ring_size: int, ring_rank: int) -> tuple[int, int, int]:
    """``(start, count, pad)``: ring rank ``ring_rank`` takes text rows ``[start, start + count)``
    after ``pad`` (0 or 1) empty rows; ``count + pad = ceil(text_len / ring_size)`` on every
    rank, and the pads sit on the lowest ring ranks (a prefix of the stripe layout)."""
    slots = -(-text_len // ring_size)
    pads = slots * ring_size - text_len
    pad = int(ring_rank < pads)
    return ring_rank * slots - min(ring_rank, pads), slots - pad, pad


def _local_text(texts: tuple[Tensor, ...], topology: Topology, plan: HeadPlan) -> list[Tensor]:
    """This rank's part of the replicated text q, k, v: its ring rows and its Ulysses head slots,
    after an empty pad row where it has one: [B, S_txt, H, D] -> [B, T, h, D] each."""
    start, count, pad = text_rows(texts[0].shape[1], topology.ring_size, topology.ring_rank)
    rank = topology.ulysses_rank
    q_slots = plan.q_slots[rank * plan.q_per_rank:(rank + 1) * plan.q_per_rank]
    kv_slots = plan.kv_slots[rank * plan.kv_per_rank:(rank + 1) * plan.kv_per_rank]
    return [_pad_rows(_slot_heads(t.narrow(1, start, count), list(slots)), pad)
            for t, slots in zip(texts, (q_slots, kv_slots, kv_slots))]


@lru_cache(maxsize=64)
def joint_mask(seq_len: int, pads: int) -> AttentionMask:
    """Full attention over ``seq_len`` stripe positions whose first ``pads`` hold no token."""
    if pads == 0:
        return AttentionMask.build(seq_len)
    documents = torch.zeros(seq_len, dtype=torch.int64)
    documents[:pads] = NOT_A_TOKEN
    return AttentionMask.build(seq_len, documents=documents)


def _slot_heads(x: Tensor, slots: list[int]) -> Tensor:
    """``[B, S, H, D]`` -> ``[B, S, len(slots), D]``: head ``slots[i]`` in slot i, zeros for -1."""
    return by_destination(x, tuple(slots), 1)[0]


def _pad_rows(x: Tensor, pad: int) -> Tensor:
    return torch.cat([x.new_zeros(x.shape[0], pad, *x.shape[2:]), x], dim=1) if pad else x


def _assemble_text(piece: Tensor, topology: Topology, plan: HeadPlan, text_len: int) -> Tensor:
    """Every rank's ``[B, T, h, D]`` text output (its ring rows, its head slots) -> the whole
    ``[B, S_txt, Hq, D]`` on every rank."""
    ring_size, ulysses = topology.ring_size, topology.ulysses_size
    if topology.sequence_size > 1:
        order = tuple(topology.sequence_index_of_group_rank)
        pieces = _GatherPieces.apply(piece, topology.sequence_group, order)  # [N, B, T, h, D]
    else:
        pieces = piece[None]
    batch, slots, heads, dim = piece.shape
    # [R·U, B, T, h, D] -> [B, R, T, U·h, D]: sequence index r·U + u holds ring r, head group u
    whole = pieces.view(ring_size, ulysses, batch, slots, heads, dim).permute(2, 0, 3, 1, 4, 5)
    whole = whole.reshape(batch, ring_size * slots, ulysses * heads, dim)
    whole = real_heads(plan, whole)
    pads = ring_size * slots - text_len
    if pads:  # drop the pad row of ring ranks 0 .. pads-1: [B, R·T, Hq, D] -> [B, S_txt, Hq, D]
        keep = [r * slots + i for r in range(ring_size) for i in range(int(r < pads), slots)]
        whole = whole.index_select(1, index_on(tuple(keep), whole.device))
    return whole


class _GatherPieces(torch.autograd.Function):
    """All-gather forward; reduce-scatter backward: the gradients are partial on every rank (the
    contract), so the true gradient of this rank's piece is the sum of every rank's part of it."""

    @staticmethod
    def forward(ctx, piece: Tensor, group: dist.ProcessGroup, order: tuple[int, ...]) -> Tensor:
        stacked = all_gather_stacked(piece, group)  # [G, ..] in group-rank order
        ctx.group, ctx.order = group, order
        by_index = sorted(range(len(order)), key=order.__getitem__)
        return stacked[list(by_index)]  # [N, ..] in sequence-index order

    @staticmethod
    def backward(ctx, grad: Tensor):
        send = grad[list(ctx.order)].contiguous()  # slice g: this rank's part of group rank g's
        recv = exchange_all_to_all(send, ctx.group)  # slice g: group rank g's part of ours
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return recv.sum(0, dtype=acc).to(grad.dtype), None, None


def _check_text(q: Tensor, k: Tensor, text_q: Tensor, text_k: Tensor, text_v: Tensor) -> None:
    """Raise ValueError, naming the numbers, unless the text fits the image q/k/v."""
    for name, t in (("text_q", text_q), ("text_k", text_k), ("text_v", text_v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or 0 in t.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a non-empty tensor [B, S_txt, H, D]; got {shape}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, the image q is {q.dtype} on "
                             f"{q.device}; pass them alike")
    if text_k.shape != text_v.shape:
        raise ValueError(f"text_k and text_v shapes differ: {tuple(text_k.shape)}, "
                         f"{tuple(text_v.shape)}")
    (batch, _, n_q, dim), (_, _, n_kv, _) = q.shape, k.shape
    if text_q.shape[0] != batch or text_q.shape[2:] != (n_q, dim):
        raise ValueError(f"text_q {tuple(text_q.shape)} must match the image q {tuple(q.shape)} "
                         f"in batch, heads and head dim ([B, S, Hq={n_q}, D={dim}])")
    if text_k.shape[1] != text_q.shape[1] or text_k.shape[0] != batch or \
            text_k.shape[2:] != (n_kv, dim):
        raise ValueError(f"text_k/text_v {tuple(text_k.shape)} must match text_q "
                         f"{tuple(text_q.shape)} in length and the image k {tuple(k.shape)} in "
                         f"batch, heads and head dim ([B, S_txt, Hkv={n_kv}, D={dim}])")


def _describe(q, k, v, text_q, text_k, text_v, softmax_scale, kernel) -> dict:
    """What every rank of a sequence group must pass alike (agreed before the first collective)."""
    tensors = (q, k, v, text_q, text_k, text_v)
    return {
        "image shapes": tuple(tuple(getattr(t, "shape", ())) for t in tensors[:3]),
        "text shapes": tuple(tuple(getattr(t, "shape", ())) for t in tensors[3:]),
        "dtypes": tuple(str(getattr(t, "dtype", None)) for t in tensors),
        "devices": tuple(str(getattr(getattr(t, "device", None), "type", None)) for t in tensors),
        "softmax_scale": softmax_scale, "kernel": getattr(kernel, "name", kernel),
        "call": "joint_attention",
    }

"""Ulysses: all-to-alls around any inner attention, for any head count.

Each rank of a Ulysses group holds ``S/U`` tokens of all heads. One all-to-all hands rank ``p``
its head group for all ``S`` tokens of the group (shards concatenated in Ulysses rank order), the
inner attention runs on those heads, and the inverse all-to-all returns the output to the
sequence split. q, k and v travel in **one** all-to-all: each destination's heads of the three
are packed side by side in one send buffer (one collective instead of three, and one again for
their gradients in the backward).

Which heads go where is a :class:`HeadPlan`. GQA: query head ``j`` reads kv head ``j // (Hq/Hkv)``,
so each rank's query heads must come with the kv heads they read:

- ``U`` divides ``Hkv``: rank ``p`` gets q heads ``[p·Hq/U, ..)`` and kv heads ``[p·Hkv/U, ..)``;
- ``Hkv`` divides ``U``: each kv head serves ``U/Hkv`` ranks and is sent to each of them (the
  bytes each rank needs; the backward sums the replicas' gradients);
- otherwise (14 query heads, or 6 kv heads, over Ulysses 4): every kv group is padded with zero
  query heads, and zero kv groups are added, until one of the two cases above holds (14/2 over 4
  runs as 16/2; 12/6 as 16/8). Padded heads cost their share of compute and bytes; their outputs
  are dropped, and no gradient reaches them, so the result is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.comm import all_to_all, exchange_all_to_all

Tensor = torch.Tensor


@dataclass(frozen=True)
class HeadPlan:
    """Slots of the padded head layout: ``q_slots[i]`` / ``kv_slots[i]`` is the source head in
    slot ``i`` (-1: a padding head). Rank ``p`` gets q slots ``[p·q_per_rank, ..)`` and kv slots
    ``[p·kv_per_rank, ..)``."""

    ulysses: int
    n_q_heads: int
    n_kv_heads: int
    q_slots: tuple[int, ...]
    kv_slots: tuple[int, ...]

    @property
    def q_per_rank(self) -> int:
        return len(self.q_slots) // self.ulysses

    @property
    def kv_per_rank(self) -> int:
        return len(self.kv_slots) // self.ulysses

    @property
    def padded(self) -> bool:
        return -1 in self.q_slots or -1 in self.kv_slots

    def describe(self) -> str:
        q, kv = len(self.q_slots), len(set(self.kv_slots) - {-1}) + self.kv_slots.count(-1)
        return f"{self.n_q_heads}/{self.n_kv_heads} heads run as {q}/{kv}"


def head_plan(n_q_heads: int, n_kv_heads: int, ulysses: int) -> HeadPlan:
    """The slots for ``n_q_heads`` query and ``n_kv_heads`` kv heads over ``ulysses`` ranks."""
    if n_q_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_q_heads={n_q_heads} is not a multiple of n_kv_heads={n_kv_heads} (GQA needs it)"
        )
    group = n_q_heads // n_kv_heads
    # kv heads: the fewest >= Hkv that U divides or that divide U
    if n_kv_heads <= ulysses:
        kv_padded = next(d for d in range(n_kv_heads, ulysses + 1) if ulysses % d == 0)
    else:
        kv_padded = -(-n_kv_heads // ulysses) * ulysses
    # the group size: the smallest >= group that makes the query heads split evenly
    step = 1 if kv_padded % ulysses == 0 else ulysses // kv_padded
    group_padded = -(-group // step) * step
    q_slots = tuple(c * group + t if c < n_kv_heads and t < group else -1
                    for c in range(kv_padded) for t in range(group_padded))
    if kv_padded % ulysses == 0:  # each rank its own kv heads
        kv_slots = tuple(c if c < n_kv_heads else -1 for c in range(kv_padded))
    else:  # each kv head to the U/Hkv' ranks of its query heads
        kv_slots = tuple(p * kv_padded // ulysses if p * kv_padded // ulysses < n_kv_heads else -1
                         for p in range(ulysses))
    return HeadPlan(ulysses, n_q_heads, n_kv_heads, q_slots, kv_slots)


def _by_destination(x: Tensor, slots: tuple[int, ...], ulysses: int) -> Tensor:
    """``[B, S_U, H, D]`` -> ``[U, B, S_U, slots/U, D]``: the heads of each destination's slots
    (a view when the slots are the heads in order; zeros in padding slots)."""
    if slots == tuple(range(x.shape[2])):
        return x.unflatten(2, (ulysses, -1)).movedim(2, 0)
    index = torch.tensor(slots, device=x.device)
    picked = x.index_select(2, index.clamp(min=0))
    if -1 in slots:
        picked = picked * (index >= 0).to(x.dtype)[:, None]
    return picked.unflatten(2, (ulysses, -1)).movedim(2, 0)


def _to_sources(grad: Tensor, slots: tuple[int, ...], n_heads: int) -> Tensor:
    """``[B, S_U, slots, D]`` gradients of the slots -> ``[B, S_U, n_heads, D]``: replicas
    summed, padding slots dropped."""
    if slots == tuple(range(n_heads)):
        return grad
    index = torch.tensor(slots, device=grad.device)
    real = index >= 0
    out = grad.new_zeros(grad.shape[0], grad.shape[1], n_heads, grad.shape[3])
    return out.index_add_(2, index[real], grad[:, :, real])


class _QKVToHeads(torch.autograd.Function):
    """q [B, S_U, Hq, D], k/v [B, S_U, Hkv, D] -> this rank's slots [B, S, q/U, D], [B, S, kv/U, D]."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan: HeadPlan):
        ulysses = plan.ulysses
        batch, local_len, _, dim = q.shape
        q_heads, kv_heads = plan.q_per_rank, plan.kv_per_rank
        with record_function("usp::all_to_all.pack"):
            # [U, B, S_U, q + 2 kv, D]: destination p's q, k and v slots side by side
            send = q.new_empty(ulysses, batch, local_len, q_heads + 2 * kv_heads, dim)
            send[..., :q_heads, :].copy_(_by_destination(q, plan.q_slots, ulysses))
            send[..., q_heads:q_heads + kv_heads, :].copy_(
                _by_destination(k, plan.kv_slots, ulysses))
            send[..., q_heads + kv_heads:, :].copy_(_by_destination(v, plan.kv_slots, ulysses))
        recv = exchange_all_to_all(send, group)  # [U (source), B, S_U, heads, D]
        with record_function("usp::all_to_all.unpack"):
            # [U, B, S_U, h, D] -> [B, U·S_U, h, D]: sources concatenated in rank order
            whole = recv.movedim(0, 1)
            parts = [whole[..., :q_heads, :], whole[..., q_heads:q_heads + kv_heads, :],
                     whole[..., q_heads + kv_heads:, :]]
            outputs = [p.reshape(batch, ulysses * local_len, p.shape[-2], dim) for p in parts]
        ctx.group, ctx.plan = group, plan
        return tuple(outputs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        group, plan = ctx.group, ctx.plan
        ulysses = plan.ulysses
        batch, seq, q_heads, dim = dq.shape
        kv_heads, local_len = dk.shape[2], seq // ulysses
        with record_function("usp::all_to_all.pack"):
            # [B, S, h, D] -> [U (the tokens' owner), B, S_U, h, D], packed side by side
            send = dq.new_empty(ulysses, batch, local_len, q_heads + 2 * kv_heads, dim)
            for grad, heads in ((dq, slice(0, q_heads)),
                                (dk, slice(q_heads, q_heads + kv_heads)),
                                (dv, slice(q_heads + kv_heads, None))):
                send[..., heads, :].copy_(grad.unflatten(1, (ulysses, local_len)).movedim(1, 0))
        recv = exchange_all_to_all(send, group)  # [U (slot group), B, S_U, h, D]
        with record_function("usp::all_to_all.unpack"):
            # [U, B, S_U, h, D] -> [B, S_U, U·h, D]: every slot's gradient, then to the heads
            slots = recv.movedim(0, 2)
            dq_slots = slots[..., :q_heads, :].flatten(2, 3)
            dk_slots = slots[..., q_heads:q_heads + kv_heads, :].flatten(2, 3)
            dv_slots = slots[..., q_heads + kv_heads:, :].flatten(2, 3)
            dq_local = _to_sources(dq_slots, plan.q_slots, plan.n_q_heads)
            dk_local = _to_sources(dk_slots, plan.kv_slots, plan.n_kv_heads)
            dv_local = _to_sources(dv_slots, plan.kv_slots, plan.n_kv_heads)
        return dq_local.contiguous(), dk_local.contiguous(), dv_local.contiguous(), None, None


def ulysses_around(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Callable[..., Tensor]
) -> Tensor:
    """All-to-all q/k/v to head groups, run ``inner(q, k, v)``, all-to-all the output back.

    q: [B, S_U, Hq, D], k/v: [B, S_U, Hkv, D]; ``inner`` sees this rank's slots [B, S, q/U, D]
    and [B, S, kv/U, D].
    """
    plan = head_plan(q.shape[2], k.shape[2], dist.get_world_size(group))
    q, k, v = _QKVToHeads.apply(q, k, v, group, plan)
    out = inner(q, k, v)  # [B, S, q/U, D]
    out = all_to_all(out, group, scatter_dim=1, gather_dim=2)  # -> [B, S_U, q slots, D]
    if plan.padded:
        real = [plan.q_slots.index(head) for head in range(plan.n_q_heads)]
        out = out.index_select(2, torch.tensor(real, device=out.device))  # padding dropped
    return out

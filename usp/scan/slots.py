"""Ulysses for scans: one all-to-all turns each rank's tokens of every head into every token of
the rank's heads, for several tensors at once, and its backward is the inverse.

A scan's inputs come in two head families that must travel together: per-head tensors (Mamba-2's
``x`` and ``dt``; the delta rule's ``v``, ``g`` and ``beta``) and per-group ones (Mamba-2's
``B`` and ``C`` groups; the delta rule's key heads ``q`` and ``k``), a group serving a run of
consecutive heads — the GQA pattern :class:`usp.attention.heads.HeadPlan` lays out for any
head count: the heads are the plan's query slots and the groups its key/value slots, so each
rank's heads arrive with the groups they read (replicated when there are fewer groups than
ranks, padded with zero slots when Ulysses cannot split them evenly).

Tensors of one dtype travel in one all-to-all, packed side by side ``[U, B, S_U, features]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.attention.heads import (HeadPlan, by_destination, head_plan, rank_heads, real_heads,
                                to_sources)
from usp.comm import all_to_all, exchange_all_to_all
from usp.topology import Topology

Tensor = torch.Tensor


def _by_dtype(tensors: tuple[Tensor, ...]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(index)
    return groups


class _ToSlots(torch.autograd.Function):
    """``[B, S_U, H_i, D_i]`` each -> ``[B, S, slots_i/U, D_i]`` each."""

    @staticmethod
    def forward(ctx, group, slots, *tensors):
        ulysses = dist.get_world_size(group)
        batch, local_len = tensors[0].shape[:2]
        outputs: list[Tensor | None] = [None] * len(tensors)
        for indices in _by_dtype(tensors).values():
            parts = [by_destination(tensors[i], slots[i], ulysses) for i in indices]
            # [U, B, S_U, n, D] each -> one buffer [U, B, S_U, Σ n·D]
            with record_function("usp::all_to_all.pack"):
                send = torch.cat([part.flatten(-2) for part in parts], dim=-1)
            recv = exchange_all_to_all(send, group)  # [U (source), B, S_U, Σ n·D]
            with record_function("usp::all_to_all.unpack"):
                offset = 0
                for i, part in zip(indices, parts):
                    width = part.shape[-2] * part.shape[-1]
                    piece = recv[..., offset:offset + width].unflatten(-1, part.shape[-2:])
                    # [U, B, S_U, n, D] -> [B, U·S_U, n, D]: sources in rank order
                    outputs[i] = piece.movedim(0, 1).flatten(1, 2)
                    offset += width
        ctx.group, ctx.slots, ctx.heads = group, slots, [t.shape[2] for t in tensors]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        ulysses = dist.get_world_size(ctx.group)
        result: list[Tensor | None] = [None] * len(grads)
        for indices in _by_dtype(grads).values():
            batch, seq = grads[indices[0]].shape[:2]
            local_len = seq // ulysses
            with record_function("usp::all_to_all.pack"):
                # [B, S, n, D] -> [U (the tokens' owner), B, S_U, n·D]
                send = torch.cat([grads[i].unflatten(1, (ulysses, local_len)).movedim(1, 0)
                                  .flatten(-2) for i in indices], dim=-1)
            recv = exchange_all_to_all(send, ctx.group)  # [U (slot group), B, S_U, Σ n·D]
            with record_function("usp::all_to_all.unpack"):
                offset = 0
                for i in indices:
                    n, width = grads[i].shape[-2], grads[i].shape[-2] * grads[i].shape[-1]
                    piece = recv[..., offset:offset + width].unflatten(-1, (n, -1))
                    # [U, B, S_U, n, D] -> [B, S_U, U·n, D]: every slot, then to the heads
                    slots = piece.movedim(0, 2).flatten(2, 3)
                    result[i] = to_sources(slots, ctx.slots[i], ctx.heads[i]).contiguous()
                    offset += width
        return (None, None, *result)


def to_head_slots(tensors: list[Tensor], slots: list[tuple[int, ...]],
                  group: dist.ProcessGroup) -> list[Tensor]:
    """Each ``[B, S_U, H_i, D_i]`` (this rank's tokens, every head) -> ``[B, S, n_i, D_i]``
    (every token of the Ulysses group, this rank's ``n_i = len(slots_i)/U`` slots); ``slots_i``
    names each slot's source head (-1: a zero padding slot). Differentiable."""
    return list(_ToSlots.apply(group, tuple(slots), *tensors))


@dataclass(frozen=True)
class RankHeads:
    """Which heads this rank scans: ``heads[i]`` is the head in slot ``i`` (-1: padding), each
    group slot serving ``repeat`` consecutive head slots."""

    plan: HeadPlan | None  # None: ulysses 1, every head stays
    group: dist.ProcessGroup | None
    heads: tuple[int, ...]
    repeat: int


def rank_heads_of(n_heads: int, n_groups: int, topology: Topology,
                  split: bool = True) -> RankHeads:
    """The slots of ``n_heads`` heads reading ``n_groups`` groups on this rank (checked:
    ``n_groups`` divides ``n_heads``); every head when not ``split`` over the Ulysses ranks."""
    if topology.ulysses_size == 1 or not split:
        return RankHeads(None, None, tuple(range(n_heads)), n_heads // n_groups)
    plan = head_plan(n_heads, n_groups, topology.ulysses_size)
    return RankHeads(plan, topology.ulysses_group, rank_heads(plan, topology.ulysses_rank),
                     plan.q_per_rank // plan.kv_per_rank)


def to_rank_heads(place: RankHeads, per_head: list[Tensor],
                  per_group: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``[B, S_U, H, D]`` / ``[B, S_U, G, D]`` -> ``[B, S, slots, D]`` each: every token of the
    Ulysses row (the ring block), this rank's head slots and group slots, each group slot read
    by ``place.repeat`` consecutive head slots."""
    if place.plan is not None:
        moved = to_head_slots(per_head + per_group,
                              [place.plan.q_slots] * len(per_head)
                              + [place.plan.kv_slots] * len(per_group), place.group)
        per_head, per_group = moved[:len(per_head)], moved[len(per_head):]
    return per_head, per_group


def from_rank_heads(place: RankHeads, out: Tensor) -> Tensor:
    """``[B, S, slots, D]`` -> ``[B, S_U, H, D]``: the inverse all-to-all, padding dropped."""
    if place.plan is None:
        return out
    out = all_to_all(out, place.group, scatter_dim=1, gather_dim=2)
    return real_heads(place.plan, out)

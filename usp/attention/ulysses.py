"""Ulysses: all-to-alls around any inner attention, for any head count.

Each rank of a Ulysses group holds ``S/U`` tokens of all heads. One all-to-all hands rank ``p``
its head group for all ``S`` tokens of the group (shards concatenated in Ulysses rank order), the
inner attention runs on those heads, and the inverse all-to-all returns the output to the
sequence split. q, k and v travel in **one** all-to-all: each destination's heads of the three
are packed side by side in one send buffer (one collective instead of three, and one again for
their gradients in the backward).

Which heads go where is a :class:`usp.attention.heads.HeadPlan` (any head count, GQA included).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.attention.heads import (HeadPlan, by_destination, head_plan, rank_heads, real_heads,
                                to_sources)
from usp.attention.ulysses_overlap import chunk_count, ulysses_overlapped
from usp.comm import all_to_all, exchange_all_to_all

Tensor = torch.Tensor


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
            send[..., :q_heads, :].copy_(by_destination(q, plan.q_slots, ulysses))
            send[..., q_heads:q_heads + kv_heads, :].copy_(
                by_destination(k, plan.kv_slots, ulysses))
            send[..., q_heads + kv_heads:, :].copy_(by_destination(v, plan.kv_slots, ulysses))
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
            dq_local = to_sources(dq_slots, plan.q_slots, plan.n_q_heads)
            dk_local = to_sources(dk_slots, plan.kv_slots, plan.n_kv_heads)
            dv_local = to_sources(dv_slots, plan.kv_slots, plan.n_kv_heads)
        return dq_local.contiguous(), dk_local.contiguous(), dv_local.contiguous(), None, None


def ulysses_around(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Callable[..., Tensor],
    chunks: int = 1,
) -> Tensor:
    """All-to-all q/k/v to head groups, run ``inner(q, k, v, heads)``, all-to-all the output back.

    q: [B, S_U, Hq, D], k/v: [B, S_U, Hkv, D]; ``inner`` sees this rank's slots [B, S, q/U, D]
    and [B, S, kv/U, D] — or, with ``chunks > 1``, up to that many head chunks of them in turn,
    each chunk's exchanges overlapping the others' attention (:mod:`usp.attention.ulysses_overlap`)
    — and ``heads``, the query head of each of its q slots (-1 for padding), for per-head
    parameters such as attention sinks.
    """
    plan = head_plan(q.shape[2], k.shape[2], dist.get_world_size(group))
    n = chunk_count(plan, chunks)
    if n > 1:
        out = ulysses_overlapped(q, k, v, group, inner, plan, n)  # [B, S_U, q slots, D]
    else:
        q, k, v = _QKVToHeads.apply(q, k, v, group, plan)
        out = inner(q, k, v, rank_heads(plan, dist.get_rank(group)))  # [B, S, q/U, D]
        out = all_to_all(out, group, scatter_dim=1, gather_dim=2)  # -> [B, S_U, q slots, D]
    return real_heads(plan, out)  # padding dropped

"""Ulysses: all-to-alls around any inner attention, with GQA kv-head replication.

Each rank of a Ulysses group holds ``S/U`` tokens of all heads. One all-to-all hands rank ``p``
the contiguous head group ``p`` of q, k and v for all ``S`` tokens of the group (shards
concatenated in Ulysses rank order), the inner attention runs on those heads, and the inverse
all-to-all returns the output to the sequence split.

q, k and v travel in **one** all-to-all: each destination's slices of the three are packed side
by side in one send buffer (one copy per tensor, as separate all-to-alls would make, but one
collective instead of three, and one again for their gradients in the backward).

GQA: query head ``j`` reads kv head ``j // (Hq/Hkv)``. Splitting q heads and kv heads contiguously
by the same ``U`` keeps that map local when ``U`` divides ``Hkv``. With fewer kv heads than ranks
(``U % Hkv == 0``), destination ``g`` needs kv head ``g // (U/Hkv)``: the packing writes that head
into each destination's slot (replication costs no extra copy; the bytes sent are those each rank
needs), and the backward sums the replicas' gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.comm import all_to_all, exchange_all_to_all

Tensor = torch.Tensor


def kv_replication(n_q_heads: int, n_kv_heads: int, ulysses: int) -> int:
    """How many ranks share each kv head (1 when U divides Hkv: each gets its own heads)."""
    if n_q_heads % ulysses != 0:
        raise ValueError(
            f"n_q_heads={n_q_heads} is not divisible by ulysses={ulysses}; choose a ulysses degree "
            f"that divides {n_q_heads} and put the rest of the sequence parallelism on the ring"
        )
    if n_kv_heads % ulysses == 0:
        return 1
    if ulysses % n_kv_heads == 0:
        return ulysses // n_kv_heads
    raise ValueError(
        f"n_kv_heads={n_kv_heads} and ulysses={ulysses}: one must divide the other (kv heads are "
        f"split, or replicated, evenly over the Ulysses ranks); use ring>1 for the remaining degree"
    )


def _kv_slots(kv: Tensor, ulysses: int, repeats: int) -> Tensor:
    """``[B, S_U, Hkv, D]`` as the per-destination view ``[U, B, S_U, Hkv·repeats/U, D]``."""
    if repeats == 1:
        return kv.unflatten(2, (ulysses, -1)).movedim(2, 0)
    # destination g = h·repeats + j reads kv head h: [Hkv, repeats, B, S_U, 1, D] (a view)
    per_head = kv.movedim(2, 0).unsqueeze(1).unsqueeze(-2)
    return per_head.expand(-1, repeats, -1, -1, -1, -1).flatten(0, 1)


class _QKVToHeads(torch.autograd.Function):
    """q [B, S_U, Hq, D], k/v [B, S_U, Hkv, D] -> [B, S, Hq_U, D], [B, S, Hkv_U, D] ×2."""

    @staticmethod
    def forward(ctx, q, k, v, group, repeats: int):
        ulysses = dist.get_world_size(group)
        batch, local_len, n_q, dim = q.shape
        q_heads, kv_heads = n_q // ulysses, k.shape[2] * repeats // ulysses
        with record_function("usp::all_to_all.pack"):
            # [U, B, S_U, Hq_U + 2·Hkv_U, D]: destination g's q, k and v heads side by side
            send = q.new_empty(ulysses, batch, local_len, q_heads + 2 * kv_heads, dim)
            send[..., :q_heads, :].copy_(q.unflatten(2, (ulysses, q_heads)).movedim(2, 0))
            send[..., q_heads:q_heads + kv_heads, :].copy_(_kv_slots(k, ulysses, repeats))
            send[..., q_heads + kv_heads:, :].copy_(_kv_slots(v, ulysses, repeats))
        recv = exchange_all_to_all(send, group)  # [U (source), B, S_U, heads, D]
        with record_function("usp::all_to_all.unpack"):
            # [U, B, S_U, h, D] -> [B, U·S_U, h, D]: sources concatenated in rank order
            whole = recv.movedim(0, 1)
            parts = [whole[..., :q_heads, :], whole[..., q_heads:q_heads + kv_heads, :],
                     whole[..., q_heads + kv_heads:, :]]
            outputs = [p.reshape(batch, ulysses * local_len, p.shape[-2], dim) for p in parts]
        ctx.group, ctx.repeats, ctx.kv_shape = group, repeats, tuple(k.shape)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        group, repeats = ctx.group, ctx.repeats
        ulysses = dist.get_world_size(group)
        batch, seq, q_heads, dim = dq.shape
        kv_heads, local_len = dk.shape[2], seq // ulysses
        with record_function("usp::all_to_all.pack"):
            # [B, S, h, D] -> [U (the tokens' owner), B, S_U, h, D], packed side by side
            send = dq.new_empty(ulysses, batch, local_len, q_heads + 2 * kv_heads, dim)
            for grad, heads in ((dq, slice(0, q_heads)),
                                (dk, slice(q_heads, q_heads + kv_heads)),
                                (dv, slice(q_heads + kv_heads, None))):
                send[..., heads, :].copy_(grad.unflatten(1, (ulysses, local_len)).movedim(1, 0))
        recv = exchange_all_to_all(send, group)  # [U (head group), B, S_U, h, D]
        with record_function("usp::all_to_all.unpack"):
            dq_local = recv[..., :q_heads, :].movedim(0, 2).flatten(2, 3)  # [B, S_U, Hq, D]
            grads = [recv[..., q_heads:q_heads + kv_heads, :],
                     recv[..., q_heads + kv_heads:, :]]  # [U, B, S_U, Hkv_U, D]
            if repeats == 1:
                dk_local, dv_local = (g.movedim(0, 2).flatten(2, 3) for g in grads)
            else:  # sum the replicas of each kv head: [Hkv, repeats, B, S_U, D] -> [B, S_U, Hkv, D]
                n_kv = ctx.kv_shape[2]
                dk_local, dv_local = (g.squeeze(-2).unflatten(0, (n_kv, repeats)).sum(1)
                                      .movedim(0, 2) for g in grads)
        return dq_local.contiguous(), dk_local.contiguous(), dv_local.contiguous(), None, None


def ulysses_around(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Callable[..., Tensor]
) -> Tensor:
    """All-to-all q/k/v to head groups, run ``inner(q, k, v)``, all-to-all the output back.

    q: [B, S_U, Hq, D], k/v: [B, S_U, Hkv, D]; ``inner`` sees [B, S, Hq_U, D] and [B, S, Hkv_U, D].
    """
    ulysses = dist.get_world_size(group)
    repeats = kv_replication(q.shape[2], k.shape[2], ulysses)
    q, k, v = _QKVToHeads.apply(q, k, v, group, repeats)
    out = inner(q, k, v)  # [B, S, Hq_U, D]
    return all_to_all(out, group, scatter_dim=1, gather_dim=2)  # -> [B, S_U, Hq, D]

"""Ulysses: an all-to-all around any inner attention, with GQA kv-head replication.

Each rank of a Ulysses group holds ``S/U`` tokens of all heads. The all-to-all hands rank ``p``
the contiguous head group ``p`` for all ``S`` tokens of the group (shards concatenated in Ulysses
rank order), the inner attention runs on those heads, and the inverse all-to-all returns the
output to the sequence split.

GQA: query head ``j`` reads kv head ``j // (Hq/Hkv)``. Splitting q heads and kv heads contiguously
by the same ``U`` keeps that map local when ``U`` divides ``Hkv``. With fewer kv heads than ranks
(``U % Hkv == 0``), each kv head is repeated ``U/Hkv`` times before the all-to-all so every rank
receives the one kv head its query heads need; autograd sums the replicas' gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from usp.comm import all_to_all

Tensor = torch.Tensor


def kv_replication(n_q_heads: int, n_kv_heads: int, ulysses: int) -> int:
    """How many times each kv head is repeated before the all-to-all (1 when U divides Hkv)."""
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


def ulysses_around(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Callable[..., Tensor]
) -> Tensor:
    """All-to-all q/k/v to head groups, run ``inner(q, k, v)``, all-to-all the output back.

    q: [B, S_U, Hq, D], k/v: [B, S_U, Hkv, D]; ``inner`` sees [B, S, Hq_U, D] and [B, S, Hkv_U, D].
    """
    ulysses = dist.get_world_size(group)
    repeats = kv_replication(q.shape[2], k.shape[2], ulysses)
    if repeats > 1:
        # [B, S_U, Hkv, D] -> [B, S_U, U, D]: kv head h serves ranks h·U/Hkv .. (h+1)·U/Hkv - 1
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    q = all_to_all(q, group, scatter_dim=2, gather_dim=1)  # [B, S_U, Hq, D] -> [B, S, Hq_U, D]
    k = all_to_all(k, group, scatter_dim=2, gather_dim=1)  # [B, S_U, Hkv, D] -> [B, S, Hkv_U, D]
    v = all_to_all(v, group, scatter_dim=2, gather_dim=1)
    out = inner(q, k, v)  # [B, S, Hq_U, D]
    return all_to_all(out, group, scatter_dim=1, gather_dim=2)  # -> [B, S_U, Hq, D]

"""Which heads go where under Ulysses, for any head count: :class:`HeadPlan`.

GQA: query head ``j`` reads kv head ``j // (Hq/Hkv)``,
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
from functools import lru_cache

import torch

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


@lru_cache(maxsize=512)
def index_on(values: tuple[int, ...], device: torch.device) -> Tensor:
    """``values`` as an int64 index tensor on ``device``, made once: an index built per call
    copies from the host, which on a GPU waits for its queue."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _indices(slots: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(source of each slot, 0 for padding; real slots' positions; their sources)``: integer
    indices (indexing with booleans waits for the device too)."""
    real = tuple(i for i, source in enumerate(slots) if source >= 0)
    return (index_on(tuple(max(source, 0) for source in slots), device), index_on(real, device),
            index_on(tuple(slots[i] for i in real), device))


def rank_heads(plan: HeadPlan, rank: int) -> tuple[int, ...]:
    """The query head in each of Ulysses rank ``rank``'s slots (-1: a padding slot)."""
    return plan.q_slots[rank * plan.q_per_rank:(rank + 1) * plan.q_per_rank]


def heads_of(values: Tensor, heads: tuple[int, ...]) -> Tensor:
    """``values`` [H] (a per-head parameter) at ``heads`` (0 at a padding slot, -1),
    differentiable: the gradient of each head sums over the slots that read it."""
    padded = torch.cat([values, values.new_zeros(1)])  # a padding slot reads the appended 0
    index = tuple(head if head >= 0 else values.shape[0] for head in heads)
    return padded.index_select(0, index_on(index, values.device))


def real_heads(plan: HeadPlan, out: Tensor) -> Tensor:
    """``[B, S, q slots, D]`` -> ``[B, S, Hq, D]``: the padding slots dropped."""
    if not plan.padded:
        return out
    real = tuple(plan.q_slots.index(head) for head in range(plan.n_q_heads))
    return out.index_select(2, index_on(real, out.device))


def by_destination(x: Tensor, slots: tuple[int, ...], ulysses: int) -> Tensor:
    """``[B, S_U, H, D]`` -> ``[U, B, S_U, slots/U, D]``: the heads of each destination's slots
    (a view when the slots are the heads in order; zeros in padding slots)."""
    if slots == tuple(range(x.shape[2])):
        return x.unflatten(2, (ulysses, -1)).movedim(2, 0)
    sources, real, _ = _indices(slots, x.device)
    picked = x.index_select(2, sources)
    if real.numel() < len(slots):  # padding slots: zeros
        picked = x.new_zeros(picked.shape).index_copy_(2, real, picked.index_select(2, real))
    return picked.unflatten(2, (ulysses, -1)).movedim(2, 0)


def to_sources(grad: Tensor, slots: tuple[int, ...], n_heads: int) -> Tensor:
    """``[B, S_U, slots, D]`` gradients of the slots -> ``[B, S_U, n_heads, D]``: replicas
    summed, padding slots dropped."""
    if slots == tuple(range(n_heads)):
        return grad
    _, real, sources = _indices(slots, grad.device)
    # replicas of a kv head sum in fp32 (fp64 stays), then round once
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out = grad.new_zeros(grad.shape[0], grad.shape[1], n_heads, grad.shape[3], dtype=acc)
    return out.index_add_(2, sources, grad.index_select(2, real).to(acc)).to(grad.dtype)

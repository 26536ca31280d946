"""Collectives of usp: an autograd all-to-all, an all-gather, the agreement before a call.

The ring's point-to-point transport is in :mod:`usp.p2p`.

Every collective here reports the bytes this rank sends to the active :class:`CommStats`
recorders, so measured traffic can be checked against the cost model (usp.plan):
all-to-all of N bytes over G ranks sends N(G-1)/G; a P2P send counts its full size; all-gather of
an N-byte input sends N(G-1); reduce-scatter of N sends N(G-1)/G; all-reduce of N sends 2N(G-1)/G.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections import Counter

import torch
import torch.distributed as dist
from torch.profiler import record_function

Tensor = torch.Tensor

KINDS = ("all_to_all", "p2p", "all_gather", "reduce_scatter", "all_reduce")
_active_stats: contextvars.ContextVar[tuple] = contextvars.ContextVar("usp_comm_stats", default=())


class CommStats:
    """Records the bytes this rank sends, by collective kind, while the context is active.

    >>> with CommStats() as stats:
    ...     usp_attention(q, k, v, topology).sum().backward()
    >>> stats.bytes["p2p"], stats.calls["all_to_all"]
    """

    def __init__(self) -> None:
        self.bytes: Counter = Counter({kind: 0 for kind in KINDS})
        self.calls: Counter = Counter({kind: 0 for kind in KINDS})
        self._token = None

    def __enter__(self) -> "CommStats":
        self._token = _active_stats.set(_active_stats.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _active_stats.reset(self._token)

    def total(self) -> int:
        return sum(self.bytes.values())


def record(kind: str, num_bytes: int) -> None:
    for stats in _active_stats.get():
        stats.bytes[kind] += int(num_bytes)
        stats.calls[kind] += 1


def nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s collectives take their tensors: CPU where its backend takes them (gloo,
    also beside NCCL as ``cuda:nccl,cpu:gloo``), else the current CUDA device (NCCL alone)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ agreement
def agree(group: dist.ProcessGroup | None, description: dict, error: str | None) -> None:
    """Raise the same ValueError on every rank of ``group`` if any rank has an ``error`` or the
    ranks' ``description`` dicts differ; return on every rank otherwise.

    A rank that rejects its input alone would leave the others waiting in the next collective,
    and ranks that disagree on a flag compute a silently wrong result, so this runs before the
    first collective of a call. Cost: one all-gather of two int64 per rank; the descriptions and
    messages themselves are gathered only when something is wrong, to say what and where. The
    descriptions are compared by a digest of their ``repr``: give them values whose repr says
    what they are (numbers, strings, tuples, digests of tensors), never tensors themselves.
    """
    if group is None or dist.get_world_size(group) == 1:
        if error is not None:
            raise ValueError(error)
        return
    with record_function("usp::agree"):
        _agree(group, description, error)


def _agree(group: dist.ProcessGroup, description: dict, error: str | None) -> None:
    digest = hashlib.blake2b(repr(sorted(description.items())).encode(), digest_size=7).digest()
    mine = torch.tensor([int(error is not None), int.from_bytes(digest, "little")],
                        dtype=torch.int64, device=collective_device(group))
    world = dist.get_world_size(group)
    # control traffic, not attention's: not counted in CommStats
    flags, digests = _gather_stacked(mine, group).cpu().unbind(1)  # [G, 2]
    if not flags.any() and bool((digests == digests[0]).all()):
        return
    reports: list = [None] * world
    dist.all_gather_object(reports, (description, error), group=group)
    ranks = [dist.get_global_rank(group, i) for i in range(world)]
    raise ValueError(_disagreement(ranks, reports))


def _disagreement(ranks: list[int], reports: list[tuple[dict, str | None]]) -> str:
    """One message, the same on every rank, from every rank's (description, error)."""
    errors = [(rank, error) for rank, (_, error) in zip(ranks, reports) if error is not None]
    if errors:
        first = errors[0][1]
        others = [rank for rank, error in errors if error != first]
        where = f"rank {errors[0][0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        extra = f"; ranks {others} rejected it for other reasons" if others else ""
        return f"{first} [{where}{extra}]"
    fields = []
    for key in sorted({key for description, _ in reports for key in description}):
        values: dict[str, list[int]] = {}
        for rank, (description, _) in zip(ranks, reports):
            values.setdefault(repr(description.get(key)), []).append(rank)
        if len(values) > 1:
            fields.append(f"{key}: " + ", ".join(f"{v} on ranks {r}" for v, r in values.items()))
    return "ranks disagree on the call (every rank must pass the same): " + "; ".join(fields)


# ------------------------------------------------------------------------------------ all-to-all
def _all_to_all(x: Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world != 0:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by "
            f"the group size {world}"
        )
    # [.., n, ..] -> [G, .., n/G, ..]: chunk g of the scatter dim goes to rank g
    with record_function("usp::all_to_all.pack"):
        send = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()
    recv = exchange_all_to_all(send, group)
    # [G, .., m, ..] -> [.., G*m, ..]: concatenate the sources along the gather dim, rank order
    with record_function("usp::all_to_all.unpack"):
        return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def exchange_all_to_all(send: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``send [G, ..]``: slice g goes to rank g; returns ``recv [G, ..]``, slice g from rank g."""
    recv, work = post_all_to_all(send, group)
    with record_function("usp::all_to_all.exchange"):
        work.wait()
    return recv


def post_all_to_all(send: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, dist.Work]:
    """:func:`exchange_all_to_all`, posted and not waited for: ``(recv, work)``; ``recv`` holds
    the received slices once ``work.wait()`` returns (on CUDA: once the stream that waited runs
    on)."""
    world = dist.get_world_size(group)
    recv = torch.empty_like(send)
    record("all_to_all", nbytes(send) * (world - 1) // world)
    with record_function("usp::all_to_all.exchange"):
        work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return recv, work


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        # the inverse all-to-all: the two dims swap roles
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``scatter_dim`` over the group's ranks and gather ``gather_dim`` in rank order.

    Differentiable; the backward is the same all-to-all with the dims swapped.
    """
    if dist.get_world_size(group) == 1:
        return x
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


# ------------------------------------------------------------------------------------ all-gather
def _gather_stacked(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous().view(1, *x.shape)
    out = torch.empty((world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    # torch 2.13 renamed all_gather_into_tensor (the name older releases know) to all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def all_gather_stacked(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``[..]`` -> ``[G, ..]``: every rank's tensor, in group-rank order (not differentiable)."""
    record("all_gather", nbytes(x) * (dist.get_world_size(group) - 1))
    return _gather_stacked(x, group)

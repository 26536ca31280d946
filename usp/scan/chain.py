"""The ring's state passing: each ring rank hands the state leaving its block to the next rank,
and in the backward the gradient of the state entering its block to the previous one.

Ring rank ``r`` holds block ``r`` of the sequence. Its entering state is the leaving state of
rank ``r - 1``, which is an affine map of *that* rank's entering state
(``S_out = M S_in + N``, :mod:`usp.scan.ssd_local`, :mod:`usp.scan.delta_local`). Each rank
computes its ``M, N`` from its own block first, then the states travel once along the ring:
rank 0 sends ``N_0``, rank ``r`` receives ``S_in``, sends ``M_r S_in + N_r`` and goes on with its
outputs. One state-sized message per rank and direction; the last rank sends nothing forward,
the first nothing backward.

Autograd carries it: :func:`StateChain.receive` is a node whose backward sends the gradient of
``S_in`` to the previous rank; :func:`StateChain.send` returns a zero scalar ("token") that the
caller adds to a tensor its outputs use, so that the send's backward — receiving the gradient
of ``S_out`` from the next rank — runs once this rank's outputs have been differentiated and
before the state's own computation is. Gradients travel in the state's dtype (fp32, or fp64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.comm import nbytes, record
from usp.topology import Topology

Tensor = torch.Tensor
# distinct tags keep the forward and backward messages of a ring group apart from the ring
# attention's (usp.p2p) and from each other
FORWARD_TAG, BACKWARD_TAG = 11, 12


class StateChain:
    """This rank's place in a chain of blocks in sequence order over ``group`` (None: a chain
    of one block). ``order`` lists the group's ranks in the order of their blocks (None: the
    group's own order)."""

    def __init__(self, group: dist.ProcessGroup | None,
                 order: list[int] | None = None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.order = list(range(self.size)) if order is None else list(order)
        self.rank = 0 if group is None else self.order.index(dist.get_rank(group))
        self._sends: list = []

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, self.order[self.rank + offset])

    def _transfer(self, operation, tensor: Tensor, offset: int, tag: int) -> list:
        if operation is dist.isend:
            record("p2p", nbytes(tensor))
        return dist.batch_isend_irecv([dist.P2POp(operation, tensor, self._peer(offset),
                                                  self.group, tag)])

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                anchor: Tensor) -> Tensor:
        """The state entering this rank's block, from the previous rank. ``anchor``: a tensor
        of this rank's graph, so that the backward (which sends the state's gradient back) runs
        whenever this rank's inputs need gradients."""
        return _Receive.apply(anchor, self, (shape, dtype, device))

    def send(self, state: Tensor) -> Tensor:
        """Post ``state`` to the next rank; returns the token (a zero scalar) to add to a tensor
        the outputs use. :meth:`finish` waits for the send."""
        return _Send.apply(state, self)

    def finish(self) -> None:
        """Wait for the sends posted by this call (their buffers may then be freed)."""
        with record_function("usp::scan.chain_wait"):
            for works, _ in self._sends:
                for work in works:
                    work.wait()
        self._sends = []


class _Receive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, chain: StateChain, like):
        shape, dtype, device = like
        state = torch.empty(shape, dtype=dtype, device=device)
        with record_function("usp::scan.chain_receive"):
            for work in chain._transfer(dist.irecv, state, -1, FORWARD_TAG):
                work.wait()
        ctx.chain = chain
        return state

    @staticmethod
    def backward(ctx, grad):
        with record_function("usp::scan.chain_send_grad"):
            for work in ctx.chain._transfer(dist.isend, grad.contiguous(), -1, BACKWARD_TAG):
                work.wait()
        return None, None, None


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, chain: StateChain):
        buffer = state.detach().contiguous()
        chain._sends.append((chain._transfer(dist.isend, buffer, 1, FORWARD_TAG), buffer))
        ctx.chain, ctx.like = chain, (state.shape, state.dtype, state.device)
        return state.new_zeros(())

    @staticmethod
    def backward(ctx, grad_token):
        shape, dtype, device = ctx.like
        grad = torch.empty(shape, dtype=dtype, device=device)
        with record_function("usp::scan.chain_receive_grad"):
            for work in ctx.chain._transfer(dist.irecv, grad, 1, BACKWARD_TAG):
                work.wait()
        return grad, None


def chain_of(topology: Topology, over_ulysses: bool) -> StateChain:
    """The chain this rank's block takes part in: the ring's blocks (each ring rank holds one
    block, its Ulysses ranks splitting the heads), or, ``over_ulysses``, every sequence shard of
    ring × ulysses in sequence order (each rank scans its own shard, every head)."""
    if not over_ulysses:
        return StateChain(topology.ring_group if topology.ring_size > 1 else None)
    if topology.sequence_size == 1:
        return StateChain(None)
    shard_of = topology.sequence_index_of_group_rank  # group rank -> shard
    order = sorted(range(len(shard_of)), key=shard_of.__getitem__)  # shard -> group rank
    return StateChain(topology.sequence_group, order)


def pass_along(chain: StateChain, leaving, like: Tensor,
               anchor: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """One rank's turn in the chain: ``(entering, token)``. ``entering`` is the state entering
    this rank's block (None on the first rank: zero), ``leaving(entering)`` the state the block
    leaves (``M S_in + N``, called only where a next rank needs it), ``like`` a tensor of the
    state's shape, dtype and device. Add ``token`` (when not None) to a tensor the outputs use,
    and call :meth:`StateChain.finish` once the outputs are computed."""
    entering = None if chain.first else chain.receive(tuple(like.shape), like.dtype,
                                                      like.device, anchor)
    token = None if chain.last else chain.send(leaving(entering))
    return entering, token

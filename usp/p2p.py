"""The ring's transport: each step sends a block to the next rank and receives one from the
previous rank, asynchronously, so the bytes travel while the current block is computed.

:class:`GroupRing` does this over a process group with ``batch_isend_irecv``. :class:`LoopbackRing`
plays one rank of a ring of any size inside one process: every transfer is a device-to-device copy
of the block being sent (a stand-in for the link, same bytes, same schedule), which is how the
one-GPU benchmark times a rank's kernels, merges and copies without other ranks. Its received
blocks hold the rank's own data, so a loopback ring's *values* are not attention over the whole
sequence; its timing is that of one rank's share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.comm import nbytes, record

Tensor = torch.Tensor


class RingExchange:
    """Asynchronous send to the rank ``offset`` ahead and receive from the one ``offset`` behind
    on a ring group (``offset`` 1: the next and the previous rank).

    ``start`` posts both operations and returns at once, so the caller computes while the bytes
    travel; ``wait`` blocks until the received buffer is filled (and the send buffer is free).
    """

    def __init__(self, group: dist.ProcessGroup, tag: int = 0, offset: int = 1) -> None:
        # distinct tags keep two exchanges in flight on one group (K/V and dK/dV) apart
        self.group, self.tag = group, tag
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (rank + offset) % self.size)
        self.prev_rank = dist.get_global_rank(group, (rank - offset) % self.size)
        self._works: list = []

    def start(self, send: Tensor, recv: Tensor) -> None:
        if self._works:
            raise RuntimeError("RingExchange.start called while an exchange is still in flight")
        record("p2p", nbytes(send))
        ops = [
            dist.P2POp(dist.isend, send, self.next_rank, self.group, self.tag),
            dist.P2POp(dist.irecv, recv, self.prev_rank, self.group, self.tag),
        ]
        with record_function("usp::ring.post"):
            self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        with record_function("usp::ring.wait"):
            for work in self._works:
                work.wait()
        self._works = []


class GroupRing:
    """The ring of a process group: its size, this rank's place, and exchanges on it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def exchange(self, tag: int, offset: int = 1) -> "RingExchange | LoopbackExchange":
        if offset % self.size == 0:  # to this rank itself: a copy
            return LoopbackExchange()
        return RingExchange(self.group, tag, offset)


class LoopbackExchange:
    """A transfer that is a copy of the sent block into the receive buffer. On CUDA the copy runs
    on a side stream, beside the compute, as a communication kernel would."""

    def __init__(self) -> None:
        self._stream, self._done = None, None

    def start(self, send: Tensor, recv: Tensor) -> None:
        if send.device.type != "cuda":
            recv.copy_(send)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(send.device)
        self._stream.wait_stream(torch.cuda.current_stream(send.device))  # send is written
        with torch.cuda.stream(self._stream):
            recv.copy_(send)
            self._done = torch.cuda.Event()
            self._done.record()

    def wait(self) -> None:
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)
            self._done = None


class LoopbackRing:
    """Rank ``rank`` of a ring of ``size`` ranks, alone in this process (benchmarks only)."""

    def __init__(self, size: int, rank: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a ring of {size}")
        self.size, self.rank = size, rank

    def exchange(self, tag: int, offset: int = 1) -> LoopbackExchange:
        return LoopbackExchange()


class SelfRing(LoopbackRing):
    """A ring of one rank (attention that needs several kernel calls on one device)."""

    def __init__(self) -> None:
        super().__init__(1, 0)

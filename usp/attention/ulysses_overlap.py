"""Ulysses with its all-to-alls overlapped with attention: the heads in chunks, as a pipeline.

Each rank's head slots (see :class:`usp.attention.heads.HeadPlan`) are split into ``n`` chunks
of whole kv groups. Forward: every chunk's q/k/v all-to-all is posted at once; chunk ``c``'s
attention starts as soon as its own exchange has arrived, while the later chunks are still
travelling, and its output's all-to-all back is posted at once, travelling while chunk ``c + 1``
computes. Only the first chunk's inputs and the last chunk's output wait in the open.

Backward: the same pipeline in reverse, with no scheduler of our own. The autograd engine runs,
among the nodes that are ready, the one created last; so the output gradients' exchanges are
posted together (last chunk first), and then chunk by chunk, last chunk first, a chunk's wait, its
attention backward and the posting of its q/k/v gradients' exchange run before the next chunk's,
each exchange travelling under the next chunk's backward. Every rank builds the same graph, so
every rank posts the same collectives in the same order.

The heads are independent, so each chunk is exactly the attention of its heads, and the output
is :func:`usp.attention.ulysses.ulysses_around`'s. When a rank holds a single kv head shared by
several chunks (GQA with ``Hkv <= U``), that kv head travels once, with the first chunk, and the
backward returns its gradient with the first chunk's, summed over the chunks in fp32 (so in 16-bit
dtypes dk and dv round differently from one kernel over all the heads; the tests hold them to
the same bound against fp64).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.attention.heads import HeadPlan, by_destination, rank_heads, to_sources
from usp.comm import post_all_to_all

Tensor = torch.Tensor


def chunk_count(plan: HeadPlan, want: int) -> int:
    """The most chunks ``<= want`` that split this rank's q slots into whole kv groups: either
    every chunk has its own kv slots (``kv_per_rank % n == 0``), or each chunk's query heads all
    read one kv slot (then the kv slots travel with the first chunk)."""
    q_heads, kv_heads = plan.q_per_rank, plan.kv_per_rank
    group = q_heads // kv_heads
    for n in range(min(want, q_heads), 1, -1):
        if q_heads % n == 0 and (kv_heads % n == 0 or group % (q_heads // n) == 0):
            return n
    return 1


class _Posted:
    """One chunk's all-to-all in flight, and later its gradient's."""

    __slots__ = ("recv", "work", "grad_recv", "grad_work")

    def post(self, send: Tensor, group) -> Tensor:
        self.recv, self.work = post_all_to_all(send, group)
        return self.recv

    def post_grad(self, send: Tensor, group) -> Tensor:
        self.grad_recv, self.grad_work = post_all_to_all(send, group)
        return self.grad_recv

    def wait(self) -> Tensor:
        with record_function("usp::all_to_all.exchange"):
            self.work.wait()
        return self.recv

    def wait_grad(self) -> Tensor:
        with record_function("usp::all_to_all.exchange"):
            self.grad_work.wait()
        return self.grad_recv


class _Chunks:
    """Which slots of this rank each chunk carries: q ``[c·qc, ..)``, kv ``[c·kvc, ..)`` when the
    kv slots split (``kv_shared`` false), all kv slots with chunk 0 otherwise."""

    def __init__(self, plan: HeadPlan, n: int) -> None:
        self.n, self.ulysses = n, plan.ulysses
        self.q_per_rank, self.kv_per_rank = plan.q_per_rank, plan.kv_per_rank
        self.qc = plan.q_per_rank // n
        self.kv_shared = plan.kv_per_rank % n != 0
        self.group = plan.q_per_rank // plan.kv_per_rank

    def kv(self, c: int) -> slice:
        """The kv slots chunk ``c`` sends."""
        if self.kv_shared:
            return slice(0, self.kv_per_rank) if c == 0 else slice(0, 0)
        kvc = self.kv_per_rank // self.n
        return slice(c * kvc, (c + 1) * kvc)

    def kv_read(self, c: int) -> slice:
        """The kv slots chunk ``c``'s query heads read."""
        if not self.kv_shared:
            return slice(0, self.kv_per_rank // self.n)  # its own, in its own exchange
        first = c * self.qc // self.group
        return slice(first, first + 1)


class _PostInputs(torch.autograd.Function):
    """q, k, v [B, S_U, H, D] -> one posted exchange per chunk (its receive buffer, still empty)."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan: HeadPlan, chunks: _Chunks, posted: list):
        ulysses, qc = plan.ulysses, chunks.qc
        with record_function("usp::all_to_all.pack"):
            by_q = by_destination(q, plan.q_slots, ulysses)  # [U, B, S_U, q/U, D]
            by_k = by_destination(k, plan.kv_slots, ulysses)
            by_v = by_destination(v, plan.kv_slots, ulysses)
        recvs = []
        for c in range(chunks.n):
            kv = chunks.kv(c)
            n_kv = kv.stop - kv.start
            with record_function("usp::all_to_all.pack"):
                send = q.new_empty(*by_q.shape[:3], qc + 2 * n_kv, q.shape[-1])
                send[..., :qc, :].copy_(by_q[..., c * qc:(c + 1) * qc, :])
                send[..., qc:qc + n_kv, :].copy_(by_k[..., kv, :])
                send[..., qc + n_kv:, :].copy_(by_v[..., kv, :])
            recvs.append(posted[c].post(send, group))
        ctx.group, ctx.plan, ctx.chunks, ctx.posted = group, plan, chunks, posted
        return tuple(recvs)

    @staticmethod
    def backward(ctx, *_grads):
        plan, chunks = ctx.plan, ctx.chunks
        qc = chunks.qc
        dq_slots = dk_slots = dv_slots = None
        for c in range(chunks.n):
            recv = ctx.posted[c].wait_grad()  # [U (slot group), B, S_U, h, D]
            with record_function("usp::all_to_all.unpack"):
                if dq_slots is None:
                    u, batch, local, _, dim = recv.shape
                    dq_slots = recv.new_empty(batch, local, u, chunks.n, qc, dim)
                    dk_slots = recv.new_empty(batch, local, u, plan.kv_per_rank, dim)
                    dv_slots = torch.empty_like(dk_slots)
                kv = chunks.kv(c)
                n_kv = kv.stop - kv.start
                dq_slots[:, :, :, c].copy_(recv[..., :qc, :].movedim(0, 2))
                dk_slots[:, :, :, kv].copy_(recv[..., qc:qc + n_kv, :].movedim(0, 2))
                dv_slots[:, :, :, kv].copy_(recv[..., qc + n_kv:, :].movedim(0, 2))
        with record_function("usp::all_to_all.unpack"):
            dq = to_sources(dq_slots.flatten(2, 4), plan.q_slots, plan.n_q_heads)
            dk = to_sources(dk_slots.flatten(2, 3), plan.kv_slots, plan.n_kv_heads)
            dv = to_sources(dv_slots.flatten(2, 3), plan.kv_slots, plan.n_kv_heads)
        return dq, dk, dv, None, None, None, None


class _TakeInputs(torch.autograd.Function):
    """Chunk ``c``'s arrived exchange -> its q [B, S, qc, D] and k, v [B, S, kv, D]."""

    @staticmethod
    def forward(ctx, recv, group, chunks: _Chunks, posted: _Posted, c: int):
        recv = posted.wait()  # [U (source), B, S_U, h, D]
        u, batch, local, _, dim = recv.shape
        qc, kv = chunks.qc, chunks.kv(c)
        n_kv = kv.stop - kv.start
        with record_function("usp::all_to_all.unpack"):
            whole = recv.movedim(0, 1)
            parts = [whole[..., :qc, :], whole[..., qc:qc + n_kv, :], whole[..., qc + n_kv:, :]]
            outputs = [p.reshape(batch, u * local, p.shape[-2], dim) for p in parts]
        ctx.group, ctx.posted, ctx.qc, ctx.n_kv = group, posted, qc, n_kv
        return tuple(outputs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        batch, seq, qc, dim = dq.shape
        u = dist.get_world_size(ctx.group)
        n_kv = ctx.n_kv
        with record_function("usp::all_to_all.pack"):
            send = dq.new_empty(u, batch, seq // u, qc + 2 * n_kv, dim)
            for grad, heads in ((dq, slice(0, qc)), (dk, slice(qc, qc + n_kv)),
                                (dv, slice(qc + n_kv, None))):
                if grad.shape[2]:
                    send[..., heads, :].copy_(grad.unflatten(1, (u, seq // u)).movedim(1, 0))
        grad_recv = ctx.posted.post_grad(send, ctx.group)
        return grad_recv, None, None, None, None


class _ShareKV(torch.autograd.Function):
    """The kv slots that travelled with chunk 0 -> each chunk's slot (``reads``). The backward
    sums the chunks' gradients of a slot in fp32 and rounds once, as one kernel over all the
    slot's query heads would, instead of adding rounded 16-bit partials."""

    @staticmethod
    def forward(ctx, k, v, reads: list):
        ctx.reads, ctx.shape, ctx.dtype = reads, k.shape, k.dtype
        return tuple(t[:, :, read].clone() for read in reads for t in (k, v))

    @staticmethod
    def backward(ctx, *grads):
        acc = torch.float64 if ctx.dtype == torch.float64 else torch.float32
        dk = torch.zeros(ctx.shape, dtype=acc, device=grads[0].device)
        dv = torch.zeros_like(dk)
        for i, read in enumerate(ctx.reads):
            dk[:, :, read] += grads[2 * i]
            dv[:, :, read] += grads[2 * i + 1]
        return dk.to(ctx.dtype), dv.to(ctx.dtype), None


class _PostOutput(torch.autograd.Function):
    """Chunk ``c``'s output [B, S, qc, D] -> its posted exchange back to the sequence split."""

    @staticmethod
    def forward(ctx, out, group, posted: _Posted):
        u = dist.get_world_size(group)
        with record_function("usp::all_to_all.pack"):
            send = out.unflatten(1, (u, -1)).movedim(1, 0).contiguous()  # [U, B, S_U, qc, D]
        ctx.posted, ctx.shape = posted, out.shape
        return posted.post(send, group)

    @staticmethod
    def backward(ctx, _grad):
        recv = ctx.posted.wait_grad()  # [U (source), B, S_U, qc, D]
        with record_function("usp::all_to_all.unpack"):
            return recv.movedim(0, 1).reshape(ctx.shape), None, None


class _TakeOutputs(torch.autograd.Function):
    """Every chunk's posted output -> [B, S_U, q slots, D] in slot order (rank, chunk, head)."""

    @staticmethod
    def forward(ctx, group, posted: list, *recvs):
        out = None
        for c, p in enumerate(posted):
            recv = p.wait()  # [U, B, S_U, qc, D]
            with record_function("usp::all_to_all.unpack"):
                if out is None:
                    u, batch, local, qc, dim = recv.shape
                    out = recv.new_empty(batch, local, u, len(posted), qc, dim)
                out[:, :, :, c].copy_(recv.movedim(0, 2))
        ctx.group, ctx.posted = group, posted
        return out.flatten(2, 4)

    @staticmethod
    def backward(ctx, dout):
        n = len(ctx.posted)
        u = dist.get_world_size(ctx.group)
        grads = [None] * n
        by_chunk = dout.unflatten(2, (u, n, -1))  # [B, S_U, U, n, qc, D]
        for c in reversed(range(n)):  # the engine takes the last chunk first
            with record_function("usp::all_to_all.pack"):
                send = by_chunk[:, :, :, c].movedim(2, 0).contiguous()
            grads[c] = ctx.posted[c].post_grad(send, ctx.group)
        return (None, None, *grads)


def ulysses_overlapped(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup,
                       inner: Callable[..., Tensor], plan: HeadPlan, n: int) -> Tensor:
    """:func:`usp.attention.ulysses.ulysses_around` in ``n`` pipelined head chunks (``n`` from
    :func:`chunk_count`); returns [B, S_U, q slots, D], padding slots included."""
    chunks = _Chunks(plan, n)
    heads = rank_heads(plan, dist.get_rank(group))
    posted_in = [_Posted() for _ in range(n)]
    posted_out = [_Posted() for _ in range(n)]
    recvs = _PostInputs.apply(q, k, v, group, plan, chunks, posted_in)
    pending, shared = [], None
    for c in range(n):
        q_c, k_c, v_c = _TakeInputs.apply(recvs[c], group, chunks, posted_in[c], c)
        if chunks.kv_shared:
            if c == 0:
                shared = _ShareKV.apply(k_c, v_c, [chunks.kv_read(i) for i in range(n)])
            k_c, v_c = shared[2 * c], shared[2 * c + 1]
        out_c = inner(q_c, k_c, v_c, heads[c * chunks.qc:(c + 1) * chunks.qc])  # [B, S, qc, D]
        pending.append(_PostOutput.apply(out_c, group, posted_out[c]))
    return _TakeOutputs.apply(group, posted_out, *pending)

"""Ring attention: one autograd Function, one forward loop and one backward loop for every mask.

Each rank keeps its query block and passes K/V blocks around the ring group. At step ``s`` rank
``r`` holds the block of ``src = (r - s) mod R``; the schedule (:mod:`usp.schedule`) says which
query rows meet which key rows under which band (causal, windows, documents, padding). The next
block's P2P transfer is posted before the current block is computed (double buffering), so
communication overlaps compute. When no rank has work after step ``T - 1`` (a sliding window
shorter than the ring's reach), the ring stops there: later blocks are neither computed nor sent.

Forward: block results merge into fp32 accumulators (:func:`merge_into`).
Backward: every block's kernel backward gets the *global* out and lse, which makes its dq, dk, dv
exact partials. dq accumulates locally in fp32; the fp32 dK/dV partial of a block travels around
the ring with it, each holder adding its share, and goes back to its owner after the last step
(to the next rank when the ring ran all R steps, straight to the owner when it stopped early).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.attention.kernels import HALF, Kernel
from usp.attention.merge import add_sinks, merge_into, sink_gradient
from usp.p2p import GroupRing, LoopbackRing, SelfRing
from usp.schedule import Piece, RingSchedule

Tensor = torch.Tensor


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotating_blocks(kv: Tensor, ring, steps: int):
    """Yield ``(source_rank, block)`` for ``steps`` ring steps, the next transfer posted first.

    ``kv`` is this rank's block (K/V here; the queries in inference's pass-Q ring). Blocks are
    received into two fresh buffers in turn, never into ``kv`` itself (the caller keeps it for
    the backward); a buffer is reused only after its own send has completed.
    """
    exchange = ring.exchange(tag=0)
    receive = [torch.empty_like(kv) for _ in range(min(2, steps - 1))]
    current = kv
    for step in range(steps):
        last = step + 1 == steps
        if not last:
            incoming = receive[step % 2]
            exchange.start(current, incoming)
        yield (ring.rank - step) % ring.size, current
        if not last:
            exchange.wait()
            current = incoming


def _rows(piece: Piece) -> tuple:
    """Index of the piece's query rows: ``[batch, q_start:q_end]``."""
    return (piece.batch or slice(None), slice(piece.q_start, piece.q_end))


def _cols(piece: Piece) -> tuple:
    return (piece.batch or slice(None), slice(piece.k_start, piece.k_end))


def _mask(piece: Piece):
    return piece.band if piece.band is not None else False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, schedule: RingSchedule, scale, kernel: Kernel, sinks=None):
        steps = schedule.last_step() + 1
        acc = _accumulator_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)  # [B, S_R, H, D]
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc,
                         device=q.device)  # [B, H, S_R]
        with record_function("usp::ring.pack"):
            kv = torch.stack([k, v])  # [2, B, S_R, Hkv, D]: one message per step
        for source, current in rotating_blocks(kv, ring, steps):
            for piece in schedule.pieces(ring.rank, source):
                rows, cols = _rows(piece), _cols(piece)
                out_block, lse_block = kernel.forward(q[rows], current[0][cols], current[1][cols],
                                                      _mask(piece), scale)
                with record_function("usp::ring.merge"):
                    merge_into(out[rows], lse[rows[0], :, rows[1]], out_block, lse_block)
        if sinks is not None:  # once, on the merge of every key's block
            out, lse = add_sinks(out, lse, sinks)
        with record_function("usp::ring.cast"):
            out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse, sinks)
        ctx.mark_non_differentiable(lse)
        ctx.ring, ctx.schedule, ctx.scale, ctx.kernel = ring, schedule, scale, kernel
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dout = dout.contiguous()  # autograd may hand over any strides (an expanded scalar's grad)
        q, kv, out, lse, sinks = ctx.saved_tensors
        ring, schedule, scale, kernel = ctx.ring, ctx.schedule, ctx.scale, ctx.kernel
        steps = schedule.last_step() + 1
        acc = _accumulator_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # two partial-dK/dV buffers: one is in flight to the next rank while the other fills
        dkv_buffers = [torch.empty(kv.shape, dtype=acc, device=q.device) for _ in range(2)]
        dkv_incoming = torch.empty(kv.shape, dtype=acc, device=q.device)
        dkv_exchange = ring.exchange(tag=1)
        # Half-precision partial gradients are rounded per block, then summed over R blocks in
        # fp32. For kernels whose half-precision backward loses too much for that (the CPU flash
        # kernel, measured), the block backward runs in fp32 so every partial is exact.
        block_dtype = q.dtype
        if q.dtype in HALF and kernel.upcast_half_backward:
            block_dtype = torch.float32
        with record_function("usp::ring.cast"):
            q_b, dout_b, out_b = (t.to(block_dtype) for t in (q, dout, out))
        for step, (source, current) in enumerate(rotating_blocks(kv, ring, steps)):
            with record_function("usp::ring.accumulate"):
                dkv = dkv_buffers[step % 2].zero_()  # [2, B, S_R, Hkv, D]
            with record_function("usp::ring.cast"):
                k_b, v_b = current.to(block_dtype)
            for piece in schedule.pieces(ring.rank, source):
                rows, cols = _rows(piece), _cols(piece)
                dq_block, dk_block, dv_block = kernel.backward(
                    dout_b[rows], q_b[rows], k_b[cols], v_b[cols], out_b[rows],
                    lse[rows[0], :, rows[1]], _mask(piece), scale,
                )
                with record_function("usp::ring.accumulate"):
                    dq[rows] += dq_block
                    dkv[0][cols] += dk_block
                    dkv[1][cols] += dv_block
            if step > 0:
                dkv_exchange.wait()  # the partial of the block we hold, from the previous rank
                with record_function("usp::ring.accumulate"):
                    dkv += dkv_incoming
            if step + 1 < steps:
                dkv_exchange.start(dkv, dkv_incoming)
        # the partial of block (rank - steps + 1) goes home; ours comes from rank + steps - 1
        home = ring.exchange(tag=2, offset=(1 - steps) % ring.size)
        home.start(dkv, dkv_incoming)
        home.wait()
        dsinks = None if sinks is None else sink_gradient(dout, out, lse, sinks)
        with record_function("usp::ring.cast"):
            dk, dv = dkv_incoming.to(kv.dtype)
            return dq.to(q.dtype), dk, dv, None, None, None, None, dsinks


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal, scale: float,
                    kernel: Kernel, sinks: Tensor | None = None) -> Tensor:
    """One device's attention through a kernel, differentiable: one kernel call under ``causal``
    (a bool or a band); ``sinks`` [H]: attention sinks (:func:`usp.attention.merge.add_sinks`)."""
    return _LocalAttention.apply(q, k, v, causal, scale, kernel, sinks)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel: Kernel, sinks=None):
        out, lse = kernel.forward(q, k, v, causal, scale)
        if sinks is not None:
            merged, lse = add_sinks(out.to(_accumulator_dtype(q.dtype)), lse, sinks)
            out = merged.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.causal, ctx.scale, ctx.kernel = causal, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout.contiguous()  # autograd may hand over any strides (an expanded scalar's grad)
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
        dsinks = None if sinks is None else sink_gradient(dout, out, lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, dsinks


def ring_attention_on_group(
    q: Tensor, k: Tensor, v: Tensor, group: "dist.ProcessGroup | LoopbackRing | None", *,
    schedule: RingSchedule, scale: float, kernel: Kernel, sinks: Tensor | None = None,
) -> Tensor:
    """Ring attention over ``group`` (None: this rank alone; or a loopback ring) on ring blocks
    ``[B, S_R, H, D]`` under ``schedule``; ``sinks`` [H]: attention sinks of these heads. No
    validation here."""
    if isinstance(group, LoopbackRing):
        ring = group
    elif group is None or dist.get_world_size(group) == 1:
        pieces = schedule.pieces(0, 0)
        whole = (q.shape[1], k.shape[1])
        if len(pieces) == 1 and pieces[0].batch is None and (
                pieces[0].q_start, pieces[0].q_end, pieces[0].k_start, pieces[0].k_end) == (
                0, whole[0], 0, whole[1]):
            return local_attention(q, k, v, _mask(pieces[0]), scale, kernel,
                                   sinks)  # one kernel call
        ring = SelfRing()
    else:
        ring = GroupRing(group)
    out, _ = _RingAttention.apply(q, k, v, ring, schedule, scale, kernel, sinks)
    return out

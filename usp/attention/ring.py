"""Ring attention: one autograd Function, one forward loop and one backward loop for every layout.

Each rank keeps its query block and passes K/V blocks around the ring group. At step ``s`` rank
``r`` holds the block of ``src = (r - s) mod R``; the layout says which query rows meet which key
rows (:func:`usp.layout.ring_step_blocks`). The next block's P2P transfer is posted before the
current block is computed (double buffering), so communication overlaps compute.

Forward: block results merge into fp32 accumulators (:func:`merge_into`).
Backward: every block's kernel backward gets the *global* out and lse, which makes its dq, dk, dv
exact partials. dq accumulates locally in fp32; the fp32 dK/dV partial of a block travels around
the ring with it, each holder adding its share, and arrives back at its owner after R sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function

from usp.attention.kernels import HALF, Kernel
from usp.attention.merge import merge_into
from usp.layout import ring_step_blocks
from usp.p2p import GroupRing, LoopbackRing

Tensor = torch.Tensor


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rotating_blocks(kv: Tensor, ring: "GroupRing | LoopbackRing"):
    """Yield ``(source_rank, kv_block)`` for each ring step, the next transfer already posted.

    Blocks are received into two fresh buffers in turn, never into ``kv`` itself (the caller
    keeps it for the backward); a buffer is reused only after its own send has completed.
    """
    ring_size, ring_rank = ring.size, ring.rank
    exchange = ring.exchange(tag=0)
    receive = [torch.empty_like(kv) for _ in range(min(2, ring_size - 1))]
    current = kv
    for step in range(ring_size):
        last = step + 1 == ring_size
        if not last:
            incoming = receive[step % 2]
            exchange.start(current, incoming)
        yield (ring_rank - step) % ring_size, current
        if not last:
            exchange.wait()
            current = incoming


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, layout, causal, scale, kernel: Kernel):
        ring_rank = ring.rank
        block_len = q.shape[1]
        acc = _accumulator_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)  # [B, S_R, H, D]
        lse = torch.full((q.shape[0], q.shape[2], block_len), float("-inf"), dtype=acc,
                         device=q.device)  # [B, H, S_R]
        with record_function("usp::ring.pack"):
            kv = torch.stack([k, v])  # [2, B, S_R, Hkv, D]: one message per step
        for source, current in _rotating_blocks(kv, ring):
            for b in ring_step_blocks(layout, causal, ring_rank, source, block_len):
                out_block, lse_block = kernel.forward(
                    q[:, b.q_start : b.q_end],
                    current[0][:, b.k_start : b.k_end],
                    current[1][:, b.k_start : b.k_end],
                    b.causal,
                    scale,
                )
                with record_function("usp::ring.merge"):
                    merge_into(out[:, b.q_start : b.q_end], lse[:, :, b.q_start : b.q_end],
                               out_block, lse_block)
        with record_function("usp::ring.cast"):
            out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.ring, ctx.layout, ctx.causal, ctx.scale, ctx.kernel = ring, layout, causal, scale, kernel
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dout = dout.contiguous()  # autograd may hand over any strides (an expanded scalar's grad)
        q, kv, out, lse = ctx.saved_tensors
        ring, layout, causal, scale, kernel = ctx.ring, ctx.layout, ctx.causal, ctx.scale, ctx.kernel
        ring_rank = ring.rank
        block_len = q.shape[1]
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
        for step, (source, current) in enumerate(_rotating_blocks(kv, ring)):
            with record_function("usp::ring.accumulate"):
                dkv = dkv_buffers[step % 2].zero_()  # [2, B, S_R, Hkv, D]
            with record_function("usp::ring.cast"):
                k_b, v_b = current.to(block_dtype)
            for b in ring_step_blocks(layout, causal, ring_rank, source, block_len):
                rows, cols = slice(b.q_start, b.q_end), slice(b.k_start, b.k_end)
                dq_block, dk_block, dv_block = kernel.backward(
                    dout_b[:, rows], q_b[:, rows], k_b[:, cols], v_b[:, cols],
                    out_b[:, rows], lse[:, :, rows], b.causal, scale,
                )
                with record_function("usp::ring.accumulate"):
                    dq[:, rows] += dq_block
                    dkv[0][:, cols] += dk_block
                    dkv[1][:, cols] += dv_block
            if step > 0:
                dkv_exchange.wait()  # the partial of the block we hold, from the previous rank
                with record_function("usp::ring.accumulate"):
                    dkv += dkv_incoming
            # after the last step the next rank is this block's owner
            dkv_exchange.start(dkv, dkv_incoming)
        dkv_exchange.wait()
        with record_function("usp::ring.cast"):
            dk, dv = dkv_incoming.to(kv.dtype)
            return dq.to(q.dtype), dk, dv, None, None, None, None, None


def local_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                    kernel: Kernel) -> Tensor:
    """One device's attention through a kernel, differentiable (the ring of size one)."""
    return _LocalAttention.apply(q, k, v, causal, scale, kernel)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel: Kernel):
        out, lse = kernel.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel = causal, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout.contiguous()  # autograd may hand over any strides (an expanded scalar's grad)
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention_on_group(
    q: Tensor, k: Tensor, v: Tensor, group: "dist.ProcessGroup | LoopbackRing | None", *,
    layout: str, causal: bool, scale: float, kernel: Kernel,
) -> Tensor:
    """Ring attention over ``group`` (or a loopback ring) on ring blocks ``[B, S_R, H, D]``; no
    validation here."""
    ring = group if isinstance(group, LoopbackRing) or group is None else GroupRing(group)
    if ring is None or ring.size == 1:
        return local_attention(q, k, v, causal, scale, kernel)
    out, _ = _RingAttention.apply(q, k, v, ring, layout, causal, scale, kernel)
    return out

"""Time and count the FLOPs of every local-kernel call, wherever the kernel is called from.

:class:`KernelClock` wraps a :class:`~usp.attention.kernels.Kernel` into one with the same name
and behaviour that also records, per call, its time and its FLOPs. On CUDA the time comes from a
pair of events around the call on the current stream (nothing is synchronised until
:meth:`seconds` is read); on CPU it is the calling thread's CPU time, so other processes sharing
the cores do not count. FLOPs follow the usual convention (the CPU bench's too): a forward costs 4·B·Hq·D per (query, key)
pair, halved for a causal square block, and a backward 2.5 times its forward.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import record_function

from usp.attention.kernels import Kernel

BACKWARD_FLOPS_FACTOR = 2.5


def attention_flops(q_shape, k_len: int, causal: bool) -> float:
    """Forward FLOPs of one kernel call on ``q [B, Sq, Hq, D]`` against ``k_len`` keys."""
    batch, q_len, heads, head_dim = q_shape
    pairs = q_len * k_len / 2 if causal else q_len * k_len
    return 4.0 * batch * heads * head_dim * pairs


class KernelClock:
    """``clock.kernel`` is ``base`` with every forward and backward call timed and counted."""

    def __init__(self, base: Kernel, device: torch.device) -> None:
        self.base, self.device = base, torch.device(device)
        self.kernel = Kernel(base.name, base.device_type, base.dtypes,
                             self._timed(base.forward, backward=False),
                             self._timed(base.backward, backward=True), base.load,
                             base.upcast_half_backward)
        self.reset()

    def reset(self) -> None:
        self.flops = 0.0
        self.calls: list = []  # (fn, args) of every call, for replay
        self._cpu_seconds = 0.0
        self._events: list = []

    def _timed(self, fn, backward: bool):
        def timed(*args):
            # forward(q, k, v, causal, scale); backward(dout, q, k, v, out, lse, causal, scale)
            q, k, causal = (args[1], args[2], args[6]) if backward else (args[0], args[1], args[3])
            factor = BACKWARD_FLOPS_FACTOR if backward else 1.0
            self.flops += factor * attention_flops(tuple(q.shape), k.shape[1], causal)
            self.calls.append((fn, args))
            return self._run(fn, args)

        return timed

    def _run(self, fn, args):
        with record_function("usp::kernel"):
            return self._run_timed(fn, args)

    def _run_timed(self, fn, args):
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            result = fn(*args)
            end.record()
            self._events.append((start, end))
            return result
        start = time.thread_time()
        result = fn(*args)
        self._cpu_seconds += time.thread_time() - start
        return result

    def seconds(self) -> float:
        """Time spent inside the kernel since :meth:`reset` (synchronises CUDA first)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return sum(start.elapsed_time(end) for start, end in self._events) / 1e3
        return self._cpu_seconds

    def replay_seconds(self) -> float:
        """Run the recorded calls again back to back, outside whatever called them; their time."""
        calls = self.calls
        self.reset()
        for fn, args in calls:
            self._run(fn, args)
        return self.seconds()

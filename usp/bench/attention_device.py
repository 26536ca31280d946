"""``usp bench attention --device cuda``: the local kernels and one ring rank on one GPU.

One GPU cannot host several NCCL ranks, so the ring is measured as **one rank of an R-rank ring
played alone** (:class:`usp.p2p.LoopbackRing`): the rank runs usp's real ring loop (its kernels,
merges, copies and double buffering), and each transfer is a device-to-device copy of the same
bytes on a side stream, as a communication kernel would run beside the compute. What a real
interconnect adds (waits for slow links) is not in these figures.

Reported, in one run, per kernel and tokens per rank T (Llama-3-8B attention by default):
- **standalone**: the kernel on the rank's full shapes ([T x T], causal and not), forward and
  forward+backward TFLOPS, against the datasheet peak and a bf16 matmul measured in the same run;
- **ring**: the rank's forward+backward step, the TFLOPS its kernel calls reach inside the ring
  steps (CUDA events around each call) against the same calls replayed back to back outside the
  ring, and the ring's own overhead (merges, copies, waits, launch gaps) as a share of the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from usp.attention.kernels import AUTO_ORDER, KERNELS, default_scale, probe
from usp.attention.ring import ring_attention_on_group
from usp.bench.kernel_clock import BACKWARD_FLOPS_FACTOR, KernelClock, attention_flops
from usp.mask import AttentionMask
from usp.p2p import LoopbackRing
from usp.precision import datasheet_peak, torch_dtype
from usp.schedule import RingSchedule



@dataclass(frozen=True)
class DeviceShape:
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    batch: int = 1
    dtype: str = "bf16"
    ring_size: int = 4
    layout: str = "zigzag"
    iters: int = 5
    warmup: int = 2
    device: str = "cuda"  # "cpu" runs the same measurement on the CPU (a check of this module)


def _seconds(step, iters: int, warmup: int, device: str) -> float:
    """Mean seconds per call of ``step`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - start) / iters
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def matmul_tflops(dtype: torch.dtype, device: str) -> float:
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2.0 * n**3 / _seconds(lambda: torch.mm(a, b), 10, 3, device) / 1e12


def device_peak(device: str, precision: str) -> float | None:
    """The dense datasheet peak of this CUDA device in ``precision`` (None off CUDA)."""
    if device != "cuda":
        return None
    return datasheet_peak(torch.cuda.get_device_name(), precision)


def _inputs(shape: DeviceShape, tokens: int, requires_grad: bool):
    dtype = torch_dtype(shape.dtype)
    make = lambda h: torch.randn(shape.batch, tokens, h, shape.head_dim,  # noqa: E731
                                 device=shape.device, dtype=dtype, requires_grad=requires_grad)
    return make(shape.heads), make(shape.kv_heads), make(shape.kv_heads), make(shape.heads)


def standalone(kernel, shape: DeviceShape, tokens: int) -> dict:
    """TFLOPS of the bare kernel on the rank's [T x T] block, causal and not."""
    q, k, v, dout = _inputs(shape, tokens, requires_grad=False)
    scale = default_scale(shape.head_dim, None)
    result = {}
    for causal in (True, False):
        flops = attention_flops(tuple(q.shape), tokens, causal)

        def forward():
            return kernel.forward(q, k, v, causal, scale)

        def train():
            out, lse = forward()
            kernel.backward(dout, q, k, v, out, lse, causal, scale)

        forward_s = _seconds(forward, shape.iters, shape.warmup, shape.device)
        train_s = _seconds(train, shape.iters, shape.warmup, shape.device)
        tag = "causal" if causal else "full"
        result[f"{tag}_fwd_tflops"] = flops / forward_s / 1e12
        result[f"{tag}_fwd_bwd_tflops"] = (1 + BACKWARD_FLOPS_FACTOR) * flops / train_s / 1e12
    return result


def ring_rank(kernel, shape: DeviceShape, tokens: int) -> dict:
    """One rank (the last) of a ``ring_size`` ring, forward+backward, on a loopback transport."""
    clock = KernelClock(kernel, torch.device(shape.device))
    q, k, v, dout = _inputs(shape, tokens, requires_grad=True)
    ring = LoopbackRing(shape.ring_size, shape.ring_size - 1)
    mask = AttentionMask.build(tokens * shape.ring_size, causal=True)
    schedule = RingSchedule(mask, shape.layout, shape.ring_size)
    scale = default_scale(shape.head_dim, None)

    def step():
        out = ring_attention_on_group(q, k, v, ring, schedule=schedule, scale=scale,
                                      kernel=clock.kernel)
        out.backward(dout)

    for _ in range(shape.warmup):
        step()
    clock.reset()
    step_s = _seconds(step, shape.iters, 0, shape.device)
    kernel_s, flops = clock.seconds() / shape.iters, clock.flops / shape.iters
    replay_s = clock.replay_seconds() / shape.iters
    return {
        "step_ms": 1e3 * step_s,
        "tflops_in_ring": flops / kernel_s / 1e12,
        "tflops_replayed": flops / replay_s / 1e12,
        "in_ring_vs_replayed": replay_s / kernel_s,
        "ring_overhead_share": 1.0 - kernel_s / step_s,
    }


def candidate_kernels(shape: DeviceShape, names: list[str] | None) -> tuple[list, list]:
    """(kernels that pass their probe, [(name, why not)] for the others)."""
    dtype = torch_dtype(shape.dtype)
    device = torch.device(shape.device, torch.cuda.current_device() if shape.device == "cuda" else None)
    chosen, skipped = [], []
    for name in names or [n for n in AUTO_ORDER[shape.device] if n != "math"]:
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; choose from {sorted(KERNELS)}")
        kernel = KERNELS[name]
        try:
            kernel.check(torch.empty(0, device=device, dtype=dtype))
            reason = probe(kernel, dtype, device, shape.head_dim)
        except ValueError as exc:
            reason = str(exc)
        if reason:
            skipped.append((name, reason))
        else:
            chosen.append(kernel)
    return chosen, skipped


def run_device_benchmark(shape: DeviceShape, tokens_per_rank: list[int],
                         names: list[str] | None = None) -> dict:
    if shape.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    kernels, skipped = candidate_kernels(shape, names)
    device_name = torch.cuda.get_device_name() if shape.device == "cuda" else "cpu"
    report = {
        "device": device_name, "torch": torch.__version__,
        "shape": shape.__dict__, "datasheet_peak_tflops": device_peak(shape.device, shape.dtype),
        "matmul_tflops": matmul_tflops(torch_dtype(shape.dtype), shape.device), "skipped": skipped,
        "rows": [],
    }
    for kernel in kernels:
        for tokens in tokens_per_rank:
            row = {"kernel": kernel.name, "tokens_per_rank": tokens}
            row.update(standalone(kernel, shape, tokens))
            row.update(ring_rank(kernel, shape, tokens))
            report["rows"].append(row)
            if shape.device == "cuda":
                torch.cuda.empty_cache()
    return report

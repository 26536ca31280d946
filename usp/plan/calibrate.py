"""Measure this machine: single-thread GEMM and attention throughput, gloo bandwidth and latency.

The planner's CPU cluster is one node of single-thread gloo ranks (how the tests and examples of
usp run here), so each throughput is measured on one thread, and the link between two ranks on
127.0.0.1. Inter-node numbers cannot be measured from one machine; they keep the preset's values.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from usp.comm import free_port
from usp.plan.specs import ClusterSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurements:
    matmul_tflops: float
    attention_tflops: float  # causal forward + backward, counted as the cost model counts it
    bandwidth_gbs: float  # bytes one rank sends per second, P2P and all-to-all averaged
    latency_us: float


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_tflops(size: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _best_seconds(lambda: a @ b, repeats=5) / 1e12


def measure_attention_tflops(seq_len: int = 1024, heads: int = 4, head_dim: int = 64,
                             dtype: torch.dtype = torch.float32) -> float:
    """Causal SDPA forward + backward; FLOPs = 3.5 x 4·H·D·S(S+1)/2, as in the cost model."""
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    flops = 3.5 * 4 * heads * head_dim * seq_len * (seq_len + 1) / 2
    return flops / _best_seconds(step, repeats=3) / 1e12


def _link_worker(rank: int, port: int, message_bytes: int, results) -> None:
    """One of two ranks: time P2P exchanges and an all-to-all; rank 0 reports (GB/s, us)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        peer = 1 - rank
        big = torch.empty(message_bytes // 4, dtype=torch.float32)
        big_in, small, small_in = torch.empty_like(big), torch.zeros(1), torch.zeros(1)

        def exchange(send: torch.Tensor, recv: torch.Tensor) -> None:
            ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        def all_to_all() -> None:
            dist.all_to_all_single(big_in, big)

        p2p_s = _best_seconds(lambda: exchange(big, big_in), repeats=5)
        a2a_s = _best_seconds(all_to_all, repeats=5)
        latency_s = _best_seconds(lambda: exchange(small, small_in), repeats=20)
        if rank == 0:
            # an all-to-all over 2 ranks sends half its input
            bandwidth = (message_bytes / p2p_s + message_bytes / 2 / a2a_s) / 2 / 1e9
            results.put((bandwidth, latency_s * 1e6))
    finally:
        dist.destroy_process_group()


def measure_gloo_link(message_bytes: int = 8 * 2**20) -> tuple[float, float]:
    """(GB/s one rank sends, one-message latency in microseconds) between two gloo ranks."""
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    processes = [ctx.Process(target=_link_worker, args=(rank, port, message_bytes, results))
                 for rank in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    for p in processes:
        if p.is_alive():
            p.kill()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed or results.empty():
        raise ValueError(
            f"gloo link measurement failed (exit codes {failed}); is 127.0.0.1 usable?"
        )
    return results.get()


def measure() -> Measurements:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one rank = one thread, as in usp's CPU worlds
    try:
        matmul, attention = measure_matmul_tflops(), measure_attention_tflops()
    finally:
        torch.set_num_threads(threads)
    bandwidth, latency = measure_gloo_link()
    found = Measurements(matmul, attention, bandwidth, latency)
    logger.info("calibrated: %s", found)
    return found


def calibrated(cluster: ClusterSpec, found: Measurements) -> ClusterSpec:
    """``cluster`` with this machine's measured compute and intra-node link.

    Peak becomes the measured GEMM rate (so matmul efficiency is 1) and attention efficiency the
    measured attention rate relative to it.
    """
    return replace(
        cluster,
        name=f"{cluster.name} (calibrated)",
        peak_tflops=found.matmul_tflops,
        matmul_efficiency=1.0,
        attention_efficiency=min(1.0, found.attention_tflops / found.matmul_tflops),
        intra_bandwidth_gbs=found.bandwidth_gbs,
        intra_latency_us=found.latency_us,
    )

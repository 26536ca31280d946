"""Measure this machine: single-thread GEMM and attention throughput, gloo bandwidth and latency.

The planner's CPU cluster is one node of single-thread gloo ranks (how the tests and examples of
usp run here), so each throughput is measured on one thread, and the link with as many ranks on
127.0.0.1 as the plan has, all sending at once (four ranks on two cores move bytes slower than
two). The cores the ranks share are counted too: with more ranks than cores the cost model
slows each rank's compute and hides no transfer (``ClusterSpec.oversubscription``). Inter-node
numbers cannot be measured from one machine; they keep the preset's values.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from usp.launch import launch_ranks
from usp.plan.specs import ClusterSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurements:
    matmul_tflops: float
    attention_tflops: float  # causal forward + backward, counted as the cost model counts it
    bandwidth_gbs: float  # bytes one rank sends per second, P2P and all-to-all averaged
    latency_us: float
    ranks: int = 2  # ranks the link was measured with, all sending at once
    cores: int = 0  # CPU cores this process may run on (0: not counted)
    sync_us: float = 0.0  # what a small exchange adds between stretches of compute, beyond latency


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


SYNC_COMPUTE_S = 0.005  # compute between two collectives when measuring sync_us


def _mean_seconds_together(fn, repeats: int) -> float:
    """Mean seconds of ``fn`` with every rank starting and ending together."""
    fn()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    dist.barrier()
    return (time.perf_counter() - start) / repeats


def _link_worker(message_bytes: int) -> tuple[float, float, float] | None:
    """One rank of the world ``usp.launch`` started: time a ring of P2P exchanges (each rank
    sends to the next and receives from the previous, as ring attention does), an all-to-all of
    all ranks, and what a small exchange adds between stretches of compute; rank 0 returns
    (GB/s, us, sync us)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    after, before = (rank + 1) % world, (rank - 1) % world
    big = torch.empty(message_bytes // 4, dtype=torch.float32)
    big_in, small, small_in = torch.empty_like(big), torch.zeros(1), torch.zeros(1)

    def exchange(send: torch.Tensor, recv: torch.Tensor) -> None:
        ops = [dist.P2POp(dist.isend, send, after), dist.P2POp(dist.irecv, recv, before)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def all_to_all() -> None:
        dist.all_to_all_single(big_in, big)

    p2p_s = _best_seconds(lambda: exchange(big, big_in), repeats=5)
    a2a_s = _best_seconds(all_to_all, repeats=5)
    latency_s = _best_seconds(lambda: exchange(small, small_in), repeats=20)
    # a step computes between collectives; where ranks share cores, an exchange then waits
    # for its peers to be scheduled, which the bare latency above never sees
    a = torch.randn(256, 256)
    gemms = torch.tensor([max(1, round(SYNC_COMPUTE_S / _best_seconds(lambda: a @ a, 5)))])
    dist.broadcast(gemms, 0)  # the same work on every rank

    def compute() -> None:
        for _ in range(int(gemms)):
            a @ a

    compute_s = _mean_seconds_together(compute, repeats=20)
    synced_s = _mean_seconds_together(lambda: (compute(), exchange(small, small_in)), 20)
    if rank == 0:
        # an all-to-all over G ranks sends (G-1)/G of its input
        sent = message_bytes * (world - 1) / world
        bandwidth = (message_bytes / p2p_s + sent / a2a_s) / 2 / 1e9
        sync = max(0.0, synced_s - compute_s - latency_s)
        return bandwidth, latency_s * 1e6, sync * 1e6
    return None


def measure_gloo_link(message_bytes: int = 8 * 2**20,
                      ranks: int = 2) -> tuple[float, float, float]:
    """(GB/s one rank sends, one-message latency in microseconds, sync microseconds) among
    ``ranks`` gloo ranks sending at once."""
    if ranks < 2:
        raise ValueError(f"the link needs at least 2 ranks, got {ranks}")
    try:
        return launch_ranks(ranks, _link_worker, message_bytes, name="usp-calibrate")[0]
    except Exception as exc:  # a failed rank: say what was measured and what to check
        raise ValueError(f"gloo link measurement failed ({type(exc).__name__}: {exc}); is "
                         "127.0.0.1 usable?") from exc


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), which its ranks share."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measure(ranks: int = 2) -> Measurements:
    """This machine, for a plan of ``ranks`` gloo ranks on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one rank = one thread, as in usp's CPU worlds
    try:
        matmul, attention = measure_matmul_tflops(), measure_attention_tflops()
    finally:
        torch.set_num_threads(threads)
    bandwidth, latency, sync = measure_gloo_link(ranks=max(2, ranks))
    found = Measurements(matmul, attention, bandwidth, latency, max(2, ranks), usable_cores(),
                         sync)
    logger.info("calibrated: %s", found)
    return found


def calibrated(cluster: ClusterSpec, found: Measurements) -> ClusterSpec:
    """``cluster`` with this machine's measured compute and intra-node link.

    Peak becomes the measured GEMM rate (so matmul efficiency is 1) and attention efficiency the
    measured attention rate relative to it; the cores the ranks share are counted.
    """
    return replace(
        cluster,
        name=f"{cluster.name} (calibrated)",
        peak_tflops=found.matmul_tflops,
        matmul_efficiency=1.0,
        attention_efficiency=min(1.0, found.attention_tflops / found.matmul_tflops),
        intra_bandwidth_gbs=found.bandwidth_gbs,
        intra_latency_us=found.latency_us,
        cores_per_node=found.cores,
        sync_us=found.sync_us,
    )

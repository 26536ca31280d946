"""``usp bench attention``: ring, Ulysses and USP attention timed on N spawned ranks, in one run.

For each configuration it reports ms per call (forward, and forward+backward), TFLOPS per rank
(causal-aware: 4·B·S²·H·D·½ for a causal forward, 2.5× that for the backward), efficiency =
(single-process full-sequence kernel time / N) / measured time, and load balance = max/mean over
ranks of the time spent inside the attention kernel (thread CPU time, so other processes sharing
the cores do not distort it). The single-process reference is measured in the same run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from usp.attention.kernels import Kernel, default_scale, resolve_kernel
from usp.attention.ring import local_attention
from usp.attention.usp import usp_attention
from usp.comm import free_port
from usp.layout import LAYOUTS, shard_sequence
from usp.topology import Topology

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class BenchShape:
    seq_len: int = 8192
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    batch: int = 1
    dtype: str = "fp32"
    causal: bool = True
    threads: int = 1
    iters: int = 3
    warmup: int = 1

    def forward_flops(self) -> float:
        full = 4.0 * self.batch * self.seq_len**2 * self.heads * self.head_dim
        return full / 2 if self.causal else full


@dataclass(frozen=True)
class BenchConfig:
    mode: str  # ring | ulysses | usp
    ring: int
    ulysses: int
    layout: str


@dataclass
class BenchRow:
    config: BenchConfig
    forward_ms: float
    train_ms: float  # forward + backward
    kernel_ms_per_rank: list[float] = field(default_factory=list)
    profile: str = ""


def configurations(nproc: int, modes: list[str], layouts: list[str]) -> list[BenchConfig]:
    configs = []
    for mode in modes:
        if mode == "ulysses":
            configs.append(BenchConfig("ulysses", 1, nproc, "contiguous"))
        elif mode == "ring":
            configs += [BenchConfig("ring", nproc, 1, layout) for layout in layouts]
        elif mode == "usp":
            grids = [(r, nproc // r) for r in range(2, nproc) if nproc % r == 0]
            configs += [BenchConfig("usp", r, u, layout) for r, u in grids for layout in layouts]
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from ring, ulysses, usp")
    return configs


def timed_kernel(base: Kernel, seconds: list[float]) -> Kernel:
    """``base`` with the thread CPU time of every forward and backward call added to ``seconds``."""

    def wrap(fn):
        def timed(*args):
            start = time.thread_time()
            result = fn(*args)
            seconds[0] += time.thread_time() - start
            return result

        return timed

    return Kernel(base.name, base.device_type, base.dtypes, wrap(base.forward), wrap(base.backward))


def global_inputs(shape: BenchShape):
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[shape.dtype]
    make = lambda heads: torch.randn(  # noqa: E731
        shape.batch, shape.seq_len, heads, shape.head_dim, generator=g).to(dtype)
    return make(shape.heads), make(shape.kv_heads), make(shape.kv_heads), make(shape.heads)


def _time_calls(step, iters: int, warmup: int, barrier=None) -> float:
    """Mean seconds per call of ``step`` after ``warmup`` calls (barriers keep ranks in step)."""
    for _ in range(warmup):
        step()
    if barrier:
        barrier()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if barrier:
        barrier()
    return (time.perf_counter() - start) / iters


def single_process_times(shape: BenchShape) -> tuple[float, float]:
    """Seconds per forward and per forward+backward of one process on the full sequence."""
    torch.set_num_threads(shape.threads)
    q, k, v, dout = global_inputs(shape)
    kernel = resolve_kernel("auto", q)
    scale = default_scale(shape.head_dim, None)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            local_attention(q, k, v, shape.causal, scale, kernel)

    def train():
        local_attention(*leaves, shape.causal, scale, kernel).backward(dout)

    return (_time_calls(forward, shape.iters, shape.warmup),
            _time_calls(train, shape.iters, shape.warmup))


def _profile_table(step) -> str:
    """Where one call's time goes, by function (cProfile: kernels, merge, waits, copies)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(step)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return text.getvalue()


def _rank_main(rank, nproc, port, shape: BenchShape, configs, out_path, with_profile):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(shape.threads)
    dist.init_process_group("gloo", rank=rank, world_size=nproc, timeout=timedelta(minutes=10))
    try:
        q, k, v, dout = global_inputs(shape)
        kernel_seconds = [0.0]
        kernel = timed_kernel(resolve_kernel("auto", q), kernel_seconds)
        topologies, rows = {}, []
        for config in configs:
            key = (config.ring, config.ulysses)
            if key not in topologies:
                topologies[key] = Topology.build(ring=config.ring, ulysses=config.ulysses)
            topology = topologies[key]
            local = [shard_sequence(t, topology, config.layout).contiguous() for t in (q, k, v, dout)]
            leaves = [t.clone().requires_grad_() for t in local[:3]]
            call = lambda *x: usp_attention(  # noqa: E731
                *x, topology, causal=shape.causal, layout=config.layout, kernel=kernel)

            def forward():
                with torch.no_grad():
                    call(*local[:3])

            def train():
                call(*leaves).backward(local[3])

            forward_s = _time_calls(forward, shape.iters, shape.warmup, dist.barrier)
            kernel_seconds[0] = 0.0
            train_s = _time_calls(train, shape.iters, 0, dist.barrier)
            times = torch.tensor([forward_s, train_s, kernel_seconds[0] / shape.iters],
                                 dtype=torch.float64)
            gathered = [torch.zeros_like(times) for _ in range(nproc)]
            dist.all_gather(gathered, times)
            profile_text = ""
            if with_profile:  # every rank runs the step (it communicates); rank 0 profiles it
                profile_text = _profile_table(train) if rank == 0 else train() or ""
            rows.append(BenchRow(
                config,
                forward_ms=1e3 * max(float(t[0]) for t in gathered),
                train_ms=1e3 * max(float(t[1]) for t in gathered),
                kernel_ms_per_rank=[1e3 * float(t[2]) for t in gathered],
                profile=profile_text,
            ))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump([asdict(r) for r in rows], f)
    finally:
        dist.destroy_process_group()


def run_benchmark(shape: BenchShape, nproc: int, configs: list[BenchConfig],
                  with_profile: bool = False) -> tuple[tuple[float, float], list[BenchRow]]:
    """Measure the single-process reference, then every configuration on ``nproc`` ranks."""
    reference = single_process_times(shape)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_rank_main, args=(nproc, free_port(), shape, configs, out_path, with_profile),
                 nprocs=nproc, join=True)
        with open(out_path) as f:
            raw = json.load(f)
    rows = [BenchRow(BenchConfig(**r.pop("config")), **r) for r in raw]
    return reference, rows


def format_rows(shape: BenchShape, nproc: int, reference, rows: list[BenchRow]) -> str:
    single_forward, single_train = reference
    forward_flops = shape.forward_flops()
    header = (f"{'mode':8} {'ring':>4} {'uly':>4} {'layout':10} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'TFLOPS/rank':>11} {'eff fwd':>8} {'eff f+b':>8} {'balance':>8} {'kernel %':>8}")
    lines = [
        f"S={shape.seq_len} B={shape.batch} H={shape.heads} Hkv={shape.kv_heads} "
        f"D={shape.head_dim} {shape.dtype} causal={shape.causal} ranks={nproc} "
        f"threads/rank={shape.threads}",
        f"single process, full sequence: forward {1e3 * single_forward:.1f} ms, "
        f"forward+backward {1e3 * single_train:.1f} ms",
        header,
        "-" * len(header),
    ]
    for row in rows:
        c = row.config
        kernel = row.kernel_ms_per_rank
        mean_kernel = sum(kernel) / len(kernel)
        tflops = 3.5 * forward_flops / nproc / (row.train_ms / 1e3) / 1e12
        layout = "-" if c.mode == "ulysses" else c.layout
        lines.append(
            f"{c.mode:8} {c.ring:>4} {c.ulysses:>4} {layout:10} {row.forward_ms:>9.1f} "
            f"{row.train_ms:>11.1f} {tflops:>11.4f} "
            f"{single_forward * 1e3 / nproc / row.forward_ms:>8.2f} "
            f"{single_train * 1e3 / nproc / row.train_ms:>8.2f} "
            f"{max(kernel) / mean_kernel:>8.2f} {100 * mean_kernel / row.train_ms:>7.0f}%"
        )
    for row in rows:
        if row.profile:
            lines += [f"\nprofile of rank 0, {row.config}:", row.profile]
    return "\n".join(lines)


__all__ = ["BenchConfig", "BenchShape", "LAYOUTS", "configurations", "format_rows", "run_benchmark"]

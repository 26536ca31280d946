"""``usp bench attention``: ring, Ulysses and USP attention timed on N spawned CPU ranks, in one run.

Timing is made robust to a noisy, shared machine:

- **Rounds**: each round measures, in turn, the single-process reference (rank 0 alone, the
  others waiting), the **ceiling** (every rank at once runs its share of the single-process
  kernel — the full sequence with ``H/N`` heads — with no communication: what N ranks sharing
  this machine's cores can reach at all), and every configuration. Load that drifts during the
  run hits all of them alike; each figure is the median over rounds.
- **Warm-up** calls before both the forward and the forward+backward timings.
- A configuration's time is the slowest rank's.

Reported per configuration: ms (forward, forward+backward), TFLOPS per rank (causal-aware:
4·B·S²·H·D·½ forward, 2.5× that backward), efficiency against the single process
((single time / N) / time) and against the ceiling (ceiling time / time), and load balance (max /
mean over ranks of the thread CPU time inside the kernel). An efficiency above 1 is flagged: it
means the load changed within a round, not that usp beat the machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from usp.attention.kernels import default_scale, resolve_kernel
from usp.attention.ring import local_attention
from usp.attention.usp import usp_attention
from usp.bench.breakdown import breakdown_of_calls, bytes_of_one_step
from usp.bench.kernel_clock import KernelClock
from usp.bench.masks import mask_options
from usp.launch import launch_ranks
from usp.layout import LAYOUTS, check_sequence_length, shard_sequence
from usp.precision import torch_dtype
from usp.topology import Topology



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
    rounds: int = 3
    window: int = 4096  # tokens a query sees under the "window" mask, itself included

    def forward_flops(self) -> float:
        full = 4.0 * self.batch * self.seq_len**2 * self.heads * self.head_dim
        return full / 2 if self.causal else full


@dataclass(frozen=True)
class BenchConfig:
    mode: str  # ring | ulysses | usp
    ring: int
    ulysses: int
    layout: str
    mask: str = "dense"  # dense | packed | window
    head_chunks: int = 1  # Ulysses' overlapped head chunks (usp_attention's head_chunks)


@dataclass
class Timing:
    """Median seconds per call over the rounds, forward and forward+backward."""

    forward_s: float
    train_s: float


@dataclass
class BenchRow:
    config: BenchConfig
    timing: Timing
    kernel_ms_per_rank: list[float] = field(default_factory=list)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # rank 0, per call kind
    bytes_sent: int = 0  # rank 0, one forward+backward


@dataclass
class BenchResult:
    single: dict[str, Timing]  # per mask
    ceiling: Timing | None
    rows: list[BenchRow]


def configurations(nproc: int, modes: list[str], layouts: list[str],
                   masks: tuple[str, ...] = ("dense",),
                   head_chunks: tuple[int, ...] = (1,)) -> list[BenchConfig]:
    """Every mode x layout that fits ``nproc`` ranks, each under every mask (and, with Ulysses
    in it, every head chunk count)."""
    return [BenchConfig(c.mode, c.ring, c.ulysses, c.layout, mask, chunks)
            for c in _layouts_and_modes(nproc, modes, layouts) for mask in masks
            for chunks in (head_chunks if c.ulysses > 1 else (1,))]


def _layouts_and_modes(nproc: int, modes: list[str], layouts: list[str]) -> list[BenchConfig]:
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


def check_benchmark(shape: BenchShape, nproc: int, configs: list[BenchConfig]) -> None:
    """Every ValueError a rank would raise, raised here before any rank is spawned."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc} must be at least 1")
    if not configs:
        raise ValueError(f"no configuration fits {nproc} ranks")
    if shape.rounds < 1 or shape.iters < 1 or shape.warmup < 0:
        raise ValueError("--rounds and --iters must be >= 1, --warmup >= 0")
    for config in configs:
        try:
            check_sequence_length(shape.seq_len, config.ring, config.ulysses, config.layout)
            if shape.heads % shape.kv_heads:
                raise ValueError(f"--heads {shape.heads} is not a multiple of --kv-heads "
                                 f"{shape.kv_heads}")
        except ValueError as exc:
            raise ValueError(f"{config.mode} ring={config.ring} ulysses={config.ulysses} "
                             f"layout={config.layout}: {exc}") from exc


def global_inputs(shape: BenchShape):
    g = torch.Generator().manual_seed(0)
    dtype = torch_dtype(shape.dtype)
    make = lambda heads: torch.randn(  # noqa: E731
        shape.batch, shape.seq_len, heads, shape.head_dim, generator=g).to(dtype)
    return make(shape.heads), make(shape.kv_heads), make(shape.kv_heads), make(shape.heads)


def _time_calls(step, iters: int, warmup: int, together: bool = True) -> float:
    """Mean seconds per call of ``step`` after ``warmup`` calls; ``together``: every rank starts
    and ends at a barrier (a rank timing alone passes False)."""
    for _ in range(warmup):
        step()
    if together:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    elapsed = (time.perf_counter() - start) / iters
    if together:
        dist.barrier()
    return elapsed


def _forward_and_train(call, tensors, shape: BenchShape, clock: KernelClock | None = None,
                       together: bool = True) -> tuple[float, ...]:
    """(forward s, forward+backward s[, kernel s per forward+backward]) of ``call(q, k, v)``."""
    q, k, v, dout = tensors
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            call(q, k, v)

    def train():
        call(*leaves).backward(dout)

    forward_s = _time_calls(forward, shape.iters, shape.warmup, together)
    if clock is not None:
        clock.reset()
    train_s = _time_calls(train, shape.iters, shape.warmup, together)
    if clock is None:
        return forward_s, train_s
    return forward_s, train_s, clock.seconds() / (shape.iters + shape.warmup)


def _slowest(seconds: tuple[float, ...]) -> list[float]:
    """Each figure's maximum over ranks."""
    return torch.tensor(_all_ranks(seconds)).max(dim=0).values.tolist()


def _ceiling_tensors(tensors, rank: int, nproc: int):
    """This rank's share of the single-process problem: all tokens, heads [r·H/N, (r+1)·H/N) and
    the kv heads they read (one replicated head when there are fewer kv heads than ranks)."""
    q, k, v, dout = tensors
    per_rank = q.shape[2] // nproc
    kv_heads = torch.unique(torch.arange(rank * per_rank, (rank + 1) * per_rank)
                            // (q.shape[2] // k.shape[2]))
    heads = slice(rank * per_rank, (rank + 1) * per_rank)
    return (q[:, :, heads].contiguous(), k[:, :, kv_heads].contiguous(),
            v[:, :, kv_heads].contiguous(), dout[:, :, heads].contiguous())


def _config_call(topology: Topology, layout: str, shape: BenchShape, kernel, mask: str,
                 head_chunks: int = 1):
    options = mask_options(shape, mask)

    def call(q, k, v):
        return usp_attention(q, k, v, topology, causal=shape.causal, layout=layout, kernel=kernel,
                             head_chunks=head_chunks, **options)

    return call


def _rank_main(shape: BenchShape, configs, breakdown: bool) -> dict:
    """One rank of the benchmark (``usp.launch`` started it in its process group); rank 0's
    result holds the samples (the single-process reference runs there alone)."""
    rank, nproc = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(shape.threads)
    tensors = global_inputs(shape)
    base = resolve_kernel("auto", tensors[0])
    clock = KernelClock(base, torch.device("cpu"))
    scale = default_scale(shape.head_dim, None)

    def single_call(q, k, v):
        return local_attention(q, k, v, shape.causal, scale, base)

    alone = Topology(sizes={"dp": 1, "ring": 1, "ulysses": 1, "tp": 1},
                     ranks={"dp": 0, "ring": 0, "ulysses": 0, "tp": 0})
    masks = list(dict.fromkeys(config.mask for config in configs))
    singles = {mask: single_call if mask == "dense" else
               _config_call(alone, "contiguous", shape, base, mask) for mask in masks}
    share = _ceiling_tensors(tensors, rank, nproc) if shape.heads % nproc == 0 else None
    prepared = []
    for config in configs:
        topology = Topology.build(ring=config.ring, ulysses=config.ulysses)
        local = [shard_sequence(t, topology, config.layout).contiguous() for t in tensors]
        prepared.append((_config_call(topology, config.layout, shape, clock.kernel,
                                      config.mask, config.head_chunks), local))
    results = {"single": {mask: [] for mask in masks}, "ceiling": [],
               "configs": [[] for _ in configs]}
    for _ in range(shape.rounds):
        for mask, call in singles.items():
            dist.barrier()
            if rank == 0:  # alone: the other ranks wait at the next barrier
                results["single"][mask].append(
                    _forward_and_train(call, tensors, shape, together=False))
            dist.barrier()
        if share is not None:
            results["ceiling"].append(_slowest(_forward_and_train(single_call, share, shape)))
        for index, (call, local) in enumerate(prepared):
            forward_s, train_s, kernel_s = _forward_and_train(call, local, shape, clock)
            results["configs"][index].append(
                _slowest((forward_s, train_s)) + [t[0] for t in _all_ranks((kernel_s,))])
    # after the rounds, so first-call work (agreement, probes) is not in it
    results["breakdown"] = [breakdown_of_calls(call, local) if breakdown else {}
                            for call, local in prepared]
    results["bytes"] = [bytes_of_one_step(call, local) for call, local in prepared]
    return results


def _all_ranks(values: tuple[float, ...]) -> list[list[float]]:
    """Every rank's ``values``, in rank order."""
    mine = torch.tensor(values, dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def _median_timing(samples) -> Timing:
    return Timing(statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))


def run_benchmark(shape: BenchShape, nproc: int, configs: list[BenchConfig],
                  breakdown: bool = False) -> BenchResult:
    """Measure the reference, the ceiling and every configuration on ``nproc`` ranks, in rounds;
    with ``breakdown``, also profile one call of each kind per configuration (rank 0's)."""
    check_benchmark(shape, nproc, configs)
    raw = launch_ranks(nproc, _rank_main, shape, configs, breakdown,
                       name="usp-bench-attention")[0]
    rows = []
    for config, samples, profiled, sent in zip(configs, raw["configs"], raw["breakdown"],
                                               raw["bytes"]):
        kernel = [statistics.median(s[2 + r] for s in samples) * 1e3 for r in range(nproc)]
        rows.append(BenchRow(config, _median_timing(samples), kernel, profiled, sent))
    ceiling = _median_timing(raw["ceiling"]) if raw["ceiling"] else None
    single = {mask: _median_timing(samples) for mask, samples in raw["single"].items()}
    return BenchResult(single, ceiling, rows)


__all__ = ["BenchConfig", "BenchResult", "BenchShape", "LAYOUTS", "asdict", "check_benchmark",
           "configurations", "run_benchmark"]

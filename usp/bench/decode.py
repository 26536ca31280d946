"""``usp bench decode``: decode latency and KV-cache bytes against the cache length, and where
pass-Q overtakes pass-KV, on N spawned CPU ranks of one run.

For each cache length P, every rank prefills a random P-token prompt into a sharded cache and
times ``steps`` decode steps (the median is reported); rank 0 then times the same model alone on
the whole sequence (the others wait), so both columns come from one run on one machine. Bytes
are each rank's allocated K/V storage (``ShardedKVCache.shard_bytes``), which falls as 1/SP.

The crossover: a continuation of T new tokens against P cached ones, T + P fixed, through either
ring, timed and with the bytes each rank sent point-to-point (``CommStats``); the rule of
:func:`usp.infer.choose_ring_pass` picks pass-Q when ``T/(T+P) < 2·Hkv/Hq``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from usp.bench.options import DecodeBench
from usp.comm import CommStats
from usp.infer import ShardedKVCache, choose_ring_pass, decode_step, prefill
from usp.launch import launch_ranks
from usp.models.llama import Llama, get_config
from usp.topology import AXES, Topology


def run_decode_benchmark(bench: DecodeBench) -> dict:
    """Validate, spawn ``bench.nproc`` ranks, return rank 0's measurements."""
    if bench.ring * bench.ulysses != bench.nproc:
        raise ValueError(f"ring={bench.ring} x ulysses={bench.ulysses} must equal --nproc "
                         f"{bench.nproc}")
    if bench.steps < 1 or min(bench.cache_lengths) < 1:
        raise ValueError(f"--steps {bench.steps} and every cache length {bench.cache_lengths} "
                         "must be at least 1")
    if max(bench.crossover_new) > bench.crossover_total:
        raise ValueError(f"new tokens {max(bench.crossover_new)} exceed the total "
                         f"{bench.crossover_total}")
    get_config(bench.model)
    return launch_ranks(bench.nproc, _measure, asdict(bench), name="usp-bench-decode")[0]


def _single_process() -> Topology:
    return Topology(sizes={axis: 1 for axis in AXES}, ranks={axis: 0 for axis in AXES})


def _decode_timing(model, topology: Topology, layout: str, prompt: torch.Tensor,
                   steps: int) -> tuple[float, int]:
    """Median seconds of ``steps`` decode steps after ``prompt``, and this rank's cache bytes."""
    cache = ShardedKVCache.for_model(model.config, topology, layout, prompt.shape[1] + steps)
    token = prefill(model, cache, prompt, topology).argmax(-1)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        token = decode_step(model, cache, token, topology).argmax(-1)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), cache.shard_bytes()


def _measure(settings: dict) -> dict:
    bench = DecodeBench(**settings)
    topology = Topology.build(ring=bench.ring, ulysses=bench.ulysses)
    model = Llama(get_config(bench.model)).eval()
    config = model.config
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in bench.cache_lengths:
        prompt = torch.randint(0, config.vocab_size, (1, length), generator=generator)
        parallel, parallel_bytes = _decode_timing(model, topology, bench.layout, prompt,
                                                  bench.steps)
        dist.barrier()
        single, single_bytes = (_decode_timing(model, _single_process(), bench.layout, prompt,
                                               bench.steps) if dist.get_rank() == 0 else (0, 0))
        dist.barrier()
        rows.append({"cache_tokens": length, "decode_s": parallel, "single_decode_s": single,
                     "rank_bytes": parallel_bytes, "single_bytes": single_bytes})
    crossover = []
    total = bench.crossover_total
    for new in bench.crossover_new:
        entry = {"new_tokens": new, "cached_tokens": total - new,
                 "rule": choose_ring_pass(new, total - new, config.n_heads, config.n_kv_heads)}
        prompt = torch.randint(0, config.vocab_size, (1, total), generator=generator)
        for ring_pass in ("kv", "q"):
            cache = ShardedKVCache.for_model(config, topology, bench.layout, total)
            if new < total:
                prefill(model, cache, prompt[:, :total - new], topology)
            dist.barrier()
            with CommStats() as stats:
                start = time.perf_counter()
                prefill(model, cache, prompt[:, total - new:], topology, ring_pass=ring_pass)
                entry[f"{ring_pass}_s"] = time.perf_counter() - start
            entry[f"{ring_pass}_p2p_bytes"] = stats.bytes["p2p"]
        crossover.append(entry)
    threshold = 2 * config.n_kv_heads / config.n_heads
    return {"bench": settings, "decode": rows, "crossover": crossover, "threshold": threshold,
            "heads": (config.n_heads, config.n_kv_heads)}

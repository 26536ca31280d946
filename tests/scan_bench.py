"""What the scans' ring costs: bytes per rank and direction, and the 2-rank split's time.

    PYTHONPATH=$PWD python -m tests.scan_bench

Prints (asserts nothing):

- the bytes each rank's state passing sends per layer and direction, measured
  (:class:`usp.CommStats`, ring 2, one forward + backward) at the scan sizes of transformers'
  default ``BambaConfig`` and ``Qwen3NextConfig``, against the formula ``batch x heads x
  state_dim x head_dim x bytes`` (the state travels in fp32 for bf16/fp32 inputs), and the
  convolution's halo against ``batch x channels x (K-1) x bytes``;
- the forward + backward time of ring 2 and Ulysses 2 — the state passed along both shards
  (``ulysses="state"``, what "auto" picks on two ranks) or the heads split by an all-to-all
  (``"heads"``) — (two gloo ranks, one thread each) against one process (one thread) on the same sequence, for SSD and the gated delta rule in
  fp32, measured as ``usp bench attention`` measures attention: in rounds, each round timing
  the single process (rank 0 alone, the other rank waiting), the ceiling (both ranks at once,
  each running the single-process scan on half the heads, no communication) and each split
  (the slower rank's time); each figure is the median over the rounds, after a warm-up.
  Efficiency = (single / 2) / split, and against the ceiling = ceiling / split;
- causal ring 2 attention of the same sizes on the scans' contiguous shards, as is and with the
  ring re-laid into zigzag (``ring_layout``), against zigzag shards.
"""

from __future__ import annotations

import statistics
import time

import torch

from tests.distributed import run_on_ranks
from usp.comm import CommStats
from usp.layout import shard_sequence
from usp.attention.usp import usp_attention
from usp.scan import causal_conv, gated_delta_scan, ssd_scan
from usp.topology import Topology

# transformers' default configs: Bamba (heads, head_dim, d_state, groups, conv channels) and
# Qwen3-Next (value heads, key heads, key dim, value dim, conv channels); conv kernel 4
BAMBA = dict(heads=128, head_dim=64, state=256, groups=1, channels=2 * 4096 + 2 * 256)
QWEN3_NEXT = dict(heads=32, key_heads=16, key_dim=128, value_dim=128,
                  channels=2 * 16 * 128 + 32 * 128)
TIMED = dict(length=4096, heads=8, head_dim=64, state=64, chunk=64)


def _ssd_inputs(length, heads, head_dim, state, groups, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    return (draw(1, length, heads, head_dim), draw(1, length, heads).sigmoid() * 0.1,
            -torch.rand(heads, generator=generator, dtype=dtype) - 0.5,
            draw(1, length, groups, state), draw(1, length, groups, state))


def _delta_inputs(length, heads, key_heads, key_dim, value_dim, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    return (draw(1, length, key_heads, key_dim), draw(1, length, key_heads, key_dim),
            draw(1, length, heads, value_dim), -draw(1, length, heads).sigmoid() * 0.1,
            draw(1, length, heads).sigmoid())


def _forward_backward(run, inputs) -> float:
    inputs = [t.detach().requires_grad_() for t in inputs]
    start = time.perf_counter()
    run(*inputs).sum().backward()
    return time.perf_counter() - start


def _ssd(topology, ulysses="auto"):
    return lambda x, dt, a, b, c: ssd_scan(x, dt, a, b, c, topology, chunk_size=TIMED["chunk"],
                                           ulysses=ulysses)


def _delta(topology, ulysses="auto"):
    return lambda q, k, v, g, beta: gated_delta_scan(q, k, v, g, beta, topology,
                                                     chunk_size=TIMED["chunk"], use_qk_l2norm=True,
                                                     ulysses=ulysses)


def _timed_inputs():
    sizes = {n: TIMED[n] for n in ("length", "heads", "head_dim", "state")}
    return {"ssd": _ssd_inputs(**sizes, groups=1),
            "delta": _delta_inputs(TIMED["length"], TIMED["heads"], TIMED["heads"] // 2,
                                   TIMED["head_dim"], TIMED["head_dim"])}


def _shard(inputs, topology):
    return [t if t.dim() == 1 else shard_sequence(t, topology, "contiguous") for t in inputs]


def _half_heads(name, inputs, rank):
    """This rank's half of the heads, whole sequence (the ceiling's share of the work)."""
    heads = inputs[2].shape[2] if name == "delta" else inputs[0].shape[2]
    keep = slice(rank * heads // 2, (rank + 1) * heads // 2)
    if name == "ssd":  # x, dt, A, B, C (one group: B and C whole)
        x, dt, a, b, c = inputs
        return [x[:, :, keep], dt[:, :, keep], a[keep], b, c]
    q, k, v, g, beta = inputs  # key heads: half as many, read by pairs of value heads
    key = slice(rank * k.shape[2] // 2, (rank + 1) * k.shape[2] // 2)
    return [q[:, :, key], k[:, :, key], v[:, :, keep], g[:, :, keep], beta[:, :, keep]]


ROUNDS = 5
SPLITS = ("ring", "ulysses, state", "ulysses, heads")  # ulysses: what crosses its ranks


def _timings(name, make, inputs, rank, world_size) -> dict:
    """Median seconds over the rounds: single (rank 0 alone), ceiling, ring and ulysses (the
    state passed along both shards, or the heads split)."""
    alone = Topology.build(ring=1)  # dp 2: each rank its own sequence
    ring, ulysses = Topology.build(ring=world_size), Topology.build(ulysses=world_size)
    runs = {"ceiling": (make(alone), _half_heads(name, inputs, rank)),
            "ring": (make(ring), _shard(inputs, ring)),
            "ulysses, state": (make(ulysses, "state"), _shard(inputs, ulysses)),
            "ulysses, heads": (make(ulysses, "heads"), _shard(inputs, ulysses))}
    samples = {"single": [], **{kind: [] for kind in runs}}
    for round_ in range(ROUNDS + 1):  # the first round warms up
        torch.distributed.barrier()
        if rank == 0:
            seconds = _forward_backward(make(alone), inputs)
            if round_:
                samples["single"].append(seconds)
        torch.distributed.barrier()
        for kind, (run, args) in runs.items():
            torch.distributed.barrier()
            seconds = torch.tensor(_forward_backward(run, args))
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
            if round_:
                samples[kind].append(float(seconds))
    return {kind: statistics.median(values) if values else None
            for kind, values in samples.items()}


def _attention_layouts(rank: int, world_size: int) -> dict:
    """Median seconds (slowest rank) of causal ring attention forward + backward on the
    scans' contiguous shards, as is (unbalanced), re-laid into zigzag for the ring
    (``ring_layout``), and on zigzag shards (no move: the balanced bar)."""
    ring = Topology.build(ring=world_size)
    generator = torch.Generator().manual_seed(0)
    length, heads, head_dim = TIMED["length"], TIMED["heads"], TIMED["head_dim"]
    whole = [torch.randn(1, length, heads, head_dim, generator=generator) for _ in range(3)]
    runs = {name: (layout, ring_layout, [shard_sequence(t, ring, layout) for t in whole])
            for name, layout, ring_layout in (("contiguous", "contiguous", None),
                                              ("contiguous, ring on zigzag", "contiguous",
                                               "zigzag"),
                                              ("zigzag", "zigzag", None))}
    samples = {name: [] for name in runs}
    for round_ in range(ROUNDS + 1):
        for name, (layout, ring_layout, shards) in runs.items():
            torch.distributed.barrier()
            seconds = torch.tensor(_forward_backward(
                lambda q, k, v: usp_attention(q, k, v, ring, causal=True, layout=layout,
                                              ring_layout=ring_layout), shards))
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
            if round_:
                samples[name].append(float(seconds))
    return {name: statistics.median(values) for name, values in samples.items()}


def on_rank(rank: int, world_size: int) -> dict:
    topology = Topology.build(ring=world_size)
    sent = {}
    for name, run, inputs in (
            ("ssd", _ssd(topology), _ssd_inputs(16, **{k: BAMBA[k] for k in
                                                       ("heads", "head_dim", "state",
                                                        "groups")})),
            ("delta", _delta(topology), _delta_inputs(16, QWEN3_NEXT["heads"],
                                                      QWEN3_NEXT["key_heads"],
                                                      QWEN3_NEXT["key_dim"],
                                                      QWEN3_NEXT["value_dim"]))):
        with CommStats() as stats:
            _forward_backward(run, _shard(inputs, topology))
        sent[name] = stats.bytes["p2p"]
    for name, channels in (("conv bamba", BAMBA["channels"]), ("conv qwen3-next",
                                                             QWEN3_NEXT["channels"])):
        x = torch.randn(1, channels, 16, dtype=torch.bfloat16)
        weight = torch.randn(channels, 4, dtype=torch.bfloat16)
        with CommStats() as stats:
            _forward_backward(lambda x, w: causal_conv(x, w, None, topology, activation="silu"),
                              [x, weight])
        sent[name] = stats.bytes["p2p"]
    times = {name: _timings(name, _ssd if name == "ssd" else _delta, inputs, rank, world_size)
             for name, inputs in _timed_inputs().items()}
    return {"bytes": sent, "times": times, "attention": _attention_layouts(rank, world_size)}


def main() -> None:
    ranks = run_on_ranks(on_rank, 2, timeout_s=600)
    print("state passing, ring 2, bytes each rank sends per layer and direction (batch 1):")
    formula = {"ssd": BAMBA["heads"] * BAMBA["head_dim"] * BAMBA["state"] * 4,
               "delta": QWEN3_NEXT["heads"] * QWEN3_NEXT["key_dim"] * QWEN3_NEXT["value_dim"] * 4,
               "conv bamba": BAMBA["channels"] * 3 * 2, "conv qwen3-next":
               QWEN3_NEXT["channels"] * 3 * 2}
    for name, expected in formula.items():
        # rank 0 sends forward only, rank 1 backward only (a ring of two)
        print(f"  {name:16s} measured rank 0 {ranks[0]['bytes'][name]:>9d}  rank 1 "
              f"{ranks[1]['bytes'][name]:>9d}  formula {expected:>9d}")
    print(f"forward+backward, fp32, S={TIMED['length']}, H={TIMED['heads']}, "
          f"head_dim={TIMED['head_dim']}, state={TIMED['state']}, chunk {TIMED['chunk']}, "
          f"median of {ROUNDS} rounds:")
    for name in ("ssd", "delta"):
        times = ranks[0]["times"][name]
        single, ceiling = times["single"], times["ceiling"]
        print(f"  {name:6s} one process {single:.3f} s, ceiling {ceiling:.3f} s")
        for kind in SPLITS:
            split = times[kind]
            print(f"         {kind + ' 2':17s} {split:.3f} s   efficiency "
                  f"{single / 2 / split:.2f}   against the ceiling {ceiling / split:.2f}")
    attention = ranks[0]["attention"]
    print(f"causal ring 2 attention beside the scans, forward+backward, fp32, same S, H, head_dim "
          f"(median of {ROUNDS} rounds, slower rank):")
    for name, seconds in attention.items():
        print(f"  {name:28s} {seconds:.3f} s   {seconds / attention['zigzag']:.2f}x zigzag's")


if __name__ == "__main__":
    main()

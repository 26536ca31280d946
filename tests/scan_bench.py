"""What the scans' ring costs: bytes per rank and direction, and the 2-rank split's time.

    PYTHONPATH=$PWD python -m tests.scan_bench

Prints (asserts nothing):

- the bytes each rank's state passing sends per layer and direction, measured
  (:class:`usp.CommStats`, ring 2, one forward + backward) at the scan sizes of transformers'
  default ``BambaConfig`` and ``Qwen3NextConfig``, against the formula ``batch x heads x
  state_dim x head_dim x bytes`` (the state travels in fp32 for bf16/fp32 inputs), and the
  convolution's halo against ``batch x channels x (K-1) x bytes``;
- the forward + backward time of ring 2 (two gloo ranks, one thread each) against one process
  (one thread) on the same sequence, for SSD and the gated delta rule in fp32: both ranks run
  the one-process version at once, then the split, alternating, best of 3 after a warm-up (the
  slower rank's), so both see the same load.
"""

from __future__ import annotations

import time

import torch

from tests.distributed import run_on_ranks
from usp.comm import CommStats
from usp.layout import shard_sequence
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


def _ssd(topology):
    return lambda x, dt, a, b, c: ssd_scan(x, dt, a, b, c, topology, chunk_size=TIMED["chunk"])


def _delta(topology):
    return lambda q, k, v, g, beta: gated_delta_scan(q, k, v, g, beta, topology,
                                                     chunk_size=TIMED["chunk"], use_qk_l2norm=True)


def _timed_inputs():
    sizes = {n: TIMED[n] for n in ("length", "heads", "head_dim", "state")}
    return {"ssd": _ssd_inputs(**sizes, groups=1),
            "delta": _delta_inputs(TIMED["length"], TIMED["heads"], TIMED["heads"] // 2,
                                   TIMED["head_dim"], TIMED["head_dim"])}


def _shard(inputs, topology):
    return [t if t.dim() == 1 else shard_sequence(t, topology, "contiguous") for t in inputs]


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
    # one process (each rank alone on the whole sequence, both at once: the same load as the
    # split) and the split, alternating, best of 3 after a warm-up
    alone_topology = Topology.build(ring=1)  # dp 2: each rank its own sequence
    times = {}
    for name, inputs in _timed_inputs().items():
        make = _ssd if name == "ssd" else _delta
        runs = {"alone": (make(alone_topology), inputs),
                "split": (make(topology), _shard(inputs, topology))}
        best = {"alone": [], "split": []}
        for _ in range(4):
            for kind, (run, args) in runs.items():
                torch.distributed.barrier()
                best[kind].append(_forward_backward(run, args))
        times[name] = {kind: min(values[1:]) for kind, values in best.items()}
    return {"bytes": sent, "times": times}


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
          f"head_dim={TIMED['head_dim']}, state={TIMED['state']}, chunk {TIMED['chunk']}:")
    for name in ("ssd", "delta"):
        alone = max(rank["times"][name]["alone"] for rank in ranks)
        split = max(rank["times"][name]["split"] for rank in ranks)
        print(f"  {name:6s} one process {alone:.3f} s   ring 2 {split:.3f} s   "
              f"speed-up {alone / split:.2f} (ideal 2)")


if __name__ == "__main__":
    main()

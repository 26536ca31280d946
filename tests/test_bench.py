"""The benchmarks' own arithmetic: FLOP accounting of the kernel clock and the one-rank ring."""

from __future__ import annotations

import math

import torch

from usp.attention.kernels import KERNELS, default_scale
from usp.attention.ring import ring_attention_on_group
from usp.bench.attention_device import DeviceShape, run_device_benchmark
from usp.cli.bench_tables import format_device_report
from usp.bench.kernel_clock import KernelClock
from usp.mask import AttentionMask
from usp.p2p import LoopbackRing
from usp.schedule import RingSchedule


def test_kernel_clock_counts_one_ring_rank_share_of_causal_flops():
    """A zigzag rank does 1/R of the causal work: the clock's FLOPs of one forward+backward of
    the last rank of a ring of R equal 3.5 x 4·B·S²·H·D/2 / R exactly (S = R·T)."""
    batch, tokens, heads, head_dim, ring_size = 1, 16, 2, 8, 4
    clock = KernelClock(KERNELS["cpu_flash"], torch.device("cpu"))
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, requires_grad=True) for _ in range(3))
    schedule = RingSchedule(AttentionMask.build(tokens * ring_size, causal=True), "zigzag",
                            ring_size)
    out = ring_attention_on_group(q, k, v, LoopbackRing(ring_size, ring_size - 1),
                                  schedule=schedule, scale=default_scale(head_dim, None),
                                  kernel=clock.kernel)
    forward_flops = clock.flops
    out.sum().backward()
    seq = ring_size * tokens
    causal_forward = 4.0 * batch * seq**2 * heads * head_dim / 2
    assert math.isclose(forward_flops, causal_forward / ring_size)
    assert math.isclose(clock.flops, 3.5 * causal_forward / ring_size)
    assert len(clock.calls) == 2 * ring_size and clock.seconds() > 0


def test_device_benchmark_runs_and_reports_sane_shares_on_cpu():
    shape = DeviceShape(heads=4, kv_heads=2, head_dim=16, dtype="fp32", device="cpu", iters=1,
                        warmup=1, ring_size=2)
    report = run_device_benchmark(shape, [64], ["cpu_flash"])
    (row,) = report["rows"]
    assert row["kernel"] == "cpu_flash" and row["tokens_per_rank"] == 64
    for key in ("full_fwd_tflops", "causal_fwd_bwd_tflops", "tflops_in_ring", "tflops_replayed"):
        assert row[key] > 0, key
    assert row["ring_overhead_share"] < 1 and row["step_ms"] > 0
    assert "cpu_flash" in format_device_report(report)


def test_cpu_benchmark_measures_reference_ceiling_and_configs_in_rounds():
    from usp.bench.attention import BenchShape, configurations, run_benchmark

    from usp.bench.masks import work_vs_dense
    from usp.cli.bench_tables import format_result

    shape = BenchShape(seq_len=64, heads=4, kv_heads=2, head_dim=8, iters=1, warmup=1, rounds=2,
                       window=8)
    configs = configurations(2, ["ring", "ulysses"], ["contiguous"], ("dense", "window"))
    result = run_benchmark(shape, 2, configs)
    for timing in result.single.values():  # no order between them: at 64 tokens a stray
        assert timing.train_s > 0 and timing.forward_s > 0  # context switch decides it
    assert result.ceiling is not None and result.ceiling.train_s > 0
    assert [(r.config.mode, r.config.layout, r.config.mask) for r in result.rows] == [
        ("ring", "contiguous", "dense"), ("ring", "contiguous", "window"),
        ("ulysses", "contiguous", "dense"), ("ulysses", "contiguous", "window")]
    for row in result.rows:
        assert row.timing.train_s > 0 and len(row.kernel_ms_per_rank) == 2
        assert all(ms > 0 for ms in row.kernel_ms_per_rank) and row.bytes_sent > 0
    ring_dense, ring_window = result.rows[:2]
    # an 8-token window over blocks of 32: about a quarter of the work (the bytes fall with
    # rings longer than the window's reach: test_attention_masks measures that at 4 ranks)
    assert ring_window.bytes_sent <= ring_dense.bytes_sent
    assert work_vs_dense(shape, ring_window.config) < 0.3
    assert "work/dense" in format_result(shape, 2, result)


def test_bad_bench_sizes_are_one_message_before_any_rank_starts(capsys):
    from usp import cli

    assert cli.main(["bench", "attention", "--nproc", "2", "--seq-len", "1001"]) == 2
    error = capsys.readouterr().err
    assert "sequence length 1001" in error and "Traceback" not in error
    assert cli.main(["bench", "attention", "--nproc", "4", "--heads", "6", "--kv-heads", "4",
                     "--modes", "ulysses"]) == 2
    assert "--heads 6 must be a multiple of --kv-heads 4" in capsys.readouterr().err

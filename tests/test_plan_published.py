"""The cost model against published measurements of Ulysses, ring and USP layouts.

Each test encodes published comparisons (usp.bench.plan_published_data says where each number
was read) and asserts that the model ranks them as measured and predicts the slowdown to within
2x. Each term added to the model for these sources is checked on the comparison it explains,
and the same comparison without the term is shown to miss, so the test guards the term.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from usp.bench.plan_published import (
    Comparison, compare, markdown, picks, predicted_seconds, summary,
)
from usp.bench.plan_published_data import SOURCES, all_cases, with_cluster
from usp.plan.attention_time import FUSED_RING, USP_RING, AttentionShape, attention_time
from usp.plan.attention_time import call_efficiency
from usp.plan.collectives import attention_traffic, transfer_seconds
from usp.plan.config import ParallelConfig, group_placement
from usp.plan.presets import ATTENTION_OVERHEAD_KEYS, get_cluster

CASES = all_cases()


def _case(name: str):
    (case,) = [c for c in CASES if c.name == name]
    return case


def _pair(case, label: str) -> Comparison:
    (comparison,) = [c for c in compare(case) if c.other.label == label]
    return comparison


def _excess_within_2x(comparison: Comparison) -> bool:
    return comparison.excess_ratio is not None and 0.5 <= comparison.excess_ratio <= 2.0


def test_summary_over_all_sources_does_not_regress():
    # The counts docs/planner.md reports ("Against published measurements"); a model change
    # that lowers any of them must say why there.
    counts = summary([c for case in CASES for c in compare(case)])
    assert counts["comparisons"] == 126 and counts["real_gaps"] == 100
    assert counts["ranked"] >= 95
    assert counts["within_2x"] >= 115
    assert counts["excess_within_2x"] >= 45
    assert picks(CASES)[0] >= 34
    assert "All sources:** 95 of 126" in markdown(CASES, SOURCES)


@pytest.mark.parametrize("name", [
    "8xH800, attention forward, 64K, ring 8 by layout",
    "8xH800, attention forward+backward, 64K, ring 8 by layout",
    "8xA100, attention forward, 64K, ring 8 by layout",
    "8xA100, attention forward+backward, 64K, ring 8 by layout",
])
def test_contiguous_ring_waits_for_its_last_rank(name):
    # ring-flash-attention README: ring 8 with the contiguous ("ring_attn") layout runs at
    # 51-54 % of the ideal, zigzag at 82-90 %: a causal pass lasts R - 1/2 blocks, not R/2.
    case = _case(name)
    contiguous = _pair(case, "contiguous")
    assert contiguous.ranked and _excess_within_2x(contiguous)
    # the same case priced as if every layout were balanced predicts no gap at all
    balanced = replace(case, rows=tuple(replace(r, config=replace(r.config, layout="zigzag"))
                                        for r in case.rows))
    assert not _excess_within_2x(_pair(balanced, "contiguous"))


def test_contiguous_layout_across_ulysses_degrees():
    # YunChang README, 8xA100 NVLink, 32K and 128K tokens: with the basic ring the fewer the
    # Ulysses ranks (the longer the ring) the slower, by about the imbalance (2R - 1)/R. (At 8K
    # Ulysses 8 itself is 2.2x slower than Ulysses 4 x ring 2, which no term here explains.)
    rows = [c for case in CASES if case.source == "yunchang" and "8xA100" in case.name
            and case.name.endswith("contiguous") and ", 8K " not in case.name
            for c in compare(case)]
    assert len(rows) == 14
    assert all(c.ranked for c in rows)
    assert sum(_excess_within_2x(c) for c in rows) == 13
    # priced as balanced layouts, none of the fourteen slowdowns is predicted
    balanced = [c for case in CASES if case.source == "yunchang" and "8xA100" in case.name
                and case.name.endswith("contiguous") and ", 8K " not in case.name
                for c in compare(replace(case, rows=tuple(
                    replace(r, config=replace(r.config, layout="zigzag")) for r in case.rows)))]
    assert sum(_excess_within_2x(c) for c in balanced) == 0


def test_short_kernel_calls_run_below_the_long_call_rate():
    # FlashAttention-2's own benchmark (A100, head dim 128, causal, forward + backward):
    # 99, 133, 155, 173, 182, 189 TFLOPS at 512 ... 16k tokens; relative to the 16k bar the model
    # gives each within 5 %, and without the term every bar would be the 16k one.
    bars = {512: 99, 1024: 133, 2048: 155, 4096: 173, 8192: 182, 16384: 189}
    for seq, tflops in bars.items():
        model = (call_efficiency(seq / 2, ATTENTION_OVERHEAD_KEYS)
                 / call_efficiency(16384 / 2, ATTENTION_OVERHEAD_KEYS))
        assert model == pytest.approx(tflops / 189, rel=0.05), seq
    # USP report Table 3 (8xA100, 32K): ring 8's 4K-token blocks make it 20 % slower than
    # Ulysses 8; Table 5 (Llama2-7B, 30K x 16): ring 8 15 % slower than Ulysses 8.
    for name, label in (("8xA100 NVLink, 32K, 32/8 heads x 128, zigzag", "U1xR8"),
                        ("Table 5: llama2-7b, 1x8 A800, 30K x16", "tp1 U1 R8")):
        case = _case(name)
        assert _excess_within_2x(_pair(case, label)), name
        assert not _excess_within_2x(_pair(with_cluster(case, attention_overhead_keys=0.0),
                                           label)), name


def test_a_ring_step_lasts_at_least_its_launches():
    # YunChang README, 8xA100, 8K tokens x 2 (1K per rank): ring 8 is 2.4x slower than
    # Ulysses 4 x ring 2; xDiT Flux on 4xH100: ring 4 is 22 % slower than Ulysses 4. Steps of
    # tens of microseconds of compute last as long as the host takes to launch them.
    small = _case("8xA100 NVLink, 8K x2, 32 heads x 32, zigzag")
    assert _excess_within_2x(_pair(small, "U1xR8"))
    assert not _excess_within_2x(_pair(with_cluster(small, launch_us=0.0), "U1xR8"))
    flux = _case("4xH100, FLUX.1-dev 1024px, torch.compile")
    assert _pair(flux, "U1xR4").ranked
    assert not _pair(with_cluster(flux, launch_us=0.0), "U1xR4").ranked


def test_sequence_parallel_alone_beats_tensor_parallel_at_80k():
    # USP report Table 6 (Llama3-8B, 2x8 A800, 80K): SP-only (tp1 U4 R4) is the fastest, 8-14 %
    # ahead of tp4/tp8 layouts. ZeRO-1 over 16 ranks must gather 15 GB of parameters after
    # each step; Megatron's distributed optimizer does it under the next forward.
    case = _case("Table 6: llama3-8b, 2x8 A800, 80K x1")
    assert compare(case)[0].best.label == "tp1 U4 R4"
    for label in ("tp8 U1 R2", "tp4 U2 R2", "tp4 U1 R4", "tp2 U1 R8"):
        assert _pair(case, label).ranked, label


def test_usp_merge_moves_what_its_kernels_move():
    # usp.attention.merge.merge_into runs unfused: 32 + e bytes per element and step, against
    # 8 + e for a fused merge; it also merges at the first step (the others only cast).
    shape = AttentionShape(1, 64 * 1024, 32, 8, 128, 2)
    cluster = get_cluster("a100x8")
    config = ParallelConfig(ring=8)
    traffic = attention_traffic(1, shape.seq_len, 32, 8, 128, 2, ring=8, ulysses=1)
    place = (group_placement(config, 8, ("ulysses",)), group_placement(config, 8, ("ring",)))
    usp, fused = (attention_time(shape, traffic, cluster, *place, implementation=kind)
                  for kind in (USP_RING, FUSED_RING))
    assert usp.merge_forward / fused.merge_forward == pytest.approx((34 / 10) * (8 / 7))
    assert usp.merge_backward > fused.merge_backward


def test_an_all_to_all_pays_one_latency():
    cluster = get_cluster("a100x8")
    placement = group_placement(ParallelConfig(ulysses=8), 8, ("ulysses",))
    latency_only = transfer_seconds("all_to_all", 1e-9, 1, placement, cluster)
    assert latency_only == pytest.approx(cluster.intra_latency_us * 1e-6, rel=1e-6)


def test_every_case_predicts_a_finite_positive_time():
    for case in CASES:
        for row in case.rows:
            assert 0 < predicted_seconds(case, row) < float("inf"), (case.name, row.label)

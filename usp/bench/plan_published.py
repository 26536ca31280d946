"""The cost model against published measurements of Ulysses, ring and hybrid (USP) layouts.

Each :class:`Case` is one published table row group: one workload on one machine, several
sequence-parallel configurations and the number the source measured for each (iterations per
second, FLOPS per GPU, or seconds). :func:`compare` predicts every configuration with the cost
model on a cluster matching the source's hardware and pairs each with the case's published
fastest: does the model rank the pair as measured, and is its gap within 2x of the measured one.
The cases themselves are in :mod:`usp.bench.plan_published_data`, with where each number was read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from usp.plan.attention_time import (
    FUSED_RING, AttentionShape, RingImplementation, attention_time, call_efficiency,
)
from usp.plan.collectives import attention_traffic
from usp.plan.config import ParallelConfig, group_placement
from usp.plan.cost import estimate, forward_time
from usp.plan.planner import TIE_BAND
from usp.plan.specs import ClusterSpec, Workload

# A published gap this small is within the sources' own noise: the yunchang tables run Ulysses 8
# (no ring: the same computation) under two ring layouts, and the two numbers differ by up to
# 6.8 % on the 8xA100 and 8xL20 boxes (33 % on the 4xA100 PCIe box).
MEASUREMENT_NOISE = 0.05
KINDS = ("attention forward", "attention forward+backward", "training step", "forward")


@dataclass(frozen=True)
class Source:
    key: str
    title: str
    location: str  # where the numbers were read: a URL, or repository, path and commit
    hardware: str
    notes: str = ""


@dataclass(frozen=True)
class Row:
    label: str
    config: ParallelConfig
    value: float  # as published: a rate (iterations/s, FLOPS/GPU) or seconds
    global_batch: int = 0  # training rows that differ in batch (0: the case's workload's)


@dataclass(frozen=True)
class Case:
    """One workload on one cluster; ``rows`` the configurations the source compares."""

    source: str
    name: str
    kind: str  # one of KINDS
    cluster: ClusterSpec
    rows: tuple[Row, ...]
    higher_is_better: bool  # rates, not times
    shape: AttentionShape | None = None  # attention cases
    workload: Workload | None = None  # training and forward cases
    # the source's ring: YunChang's and ring-flash-attention's merge is one TorchScript
    # function, priced as one fused kernel (assumed for Megatron-LM's TransformerEngine too)
    implementation: RingImplementation = FUSED_RING

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; choose one of {KINDS}")
        if (self.shape is None) == (self.workload is None):
            raise ValueError(f"case {self.name!r}: give exactly one of shape and workload")


def attention_seconds(shape: AttentionShape, cluster: ClusterSpec, config: ParallelConfig,
                      backward: bool, implementation: RingImplementation) -> float:
    """One attention call of ``shape`` on a ring x Ulysses grid filling ``cluster``."""
    traffic = attention_traffic(shape.batch, shape.seq_len, shape.q_heads, shape.kv_heads,
                                shape.head_dim, shape.element_bytes, config.ring, config.ulysses)
    timing = attention_time(
        shape, traffic, cluster,
        group_placement(config, cluster.gpus_per_node, ("ulysses",)),
        group_placement(config, cluster.gpus_per_node, ("ring",)), config.layout,
        implementation=implementation)
    return timing.forward + (timing.backward if backward else 0.0)


def calibrated(cluster: ClusterSpec, shape: AttentionShape, seconds: float,
               backward: bool) -> ClusterSpec:
    """``cluster`` with the long-call attention efficiency that makes one GPU's call of ``shape``
    take ``seconds`` (a source's own single-GPU kernel measurement)."""
    flops = 4 * shape.batch * shape.q_heads * shape.head_dim * shape.pairs
    flops *= 3.5 if backward else 1.0  # the 2.5x backward of usp.plan.attention_time
    keys = shape.seq_len / 2 if shape.causal else shape.seq_len
    rate = flops / seconds / call_efficiency(keys, cluster.attention_overhead_keys)
    return replace(cluster, attention_efficiency=rate / (cluster.peak_tflops * 1e12))


def predicted_seconds(case: Case, row: Row) -> float:
    """Seconds per unit of the row's published number: one call, one sequence, one step."""
    if case.shape is not None:
        return attention_seconds(case.shape, case.cluster, row.config,
                                 case.kind == "attention forward+backward", case.implementation)
    workload = case.workload
    if row.global_batch:
        workload = replace(workload, global_batch=row.global_batch)
    if case.kind == "forward":
        return forward_time(workload, case.cluster, row.config, case.implementation)
    # FLOPS per GPU of one workload are proportional to sequences per second
    step = estimate(workload, case.cluster, row.config, case.implementation).step_time
    return step / workload.global_batch


@dataclass(frozen=True)
class Comparison:
    """A configuration against the fastest the source measured for the same case."""

    case: Case
    best: Row
    other: Row
    published_gap: float  # other's time over the best's, >= 1
    predicted_gap: float  # the same, predicted

    @property
    def ranked(self) -> bool:
        """The model puts the published faster one ahead; or the measurement cannot separate the
        two (:data:`MEASUREMENT_NOISE`) and the model does not put the other ahead by more than
        its own uncertainty (:data:`usp.plan.planner.TIE_BAND`)."""
        if self.published_gap < 1 + MEASUREMENT_NOISE:
            return self.predicted_gap > 1 - TIE_BAND
        return self.predicted_gap > 1

    @property
    def gap_ratio(self) -> float:
        """Predicted gap over published gap (1: the model's gap is the measured one)."""
        return self.predicted_gap / self.published_gap

    @property
    def gap_within_2x(self) -> bool:
        return 0.5 <= self.gap_ratio <= 2.0

    @property
    def excess_ratio(self) -> float | None:
        """How much of the published slowdown the model predicts, ``(pred - 1)/(pub - 1)``;
        None when the published gap is within the measurement noise."""
        if self.published_gap < 1 + MEASUREMENT_NOISE:
            return None
        return (self.predicted_gap - 1) / (self.published_gap - 1)


def compare(case: Case) -> list[Comparison]:
    """Every row of ``case`` against the row the source measured fastest."""
    def published_seconds(row: Row) -> float:
        return 1 / row.value if case.higher_is_better else row.value

    best = min(case.rows, key=published_seconds)
    predicted = {row.label: predicted_seconds(case, row) for row in case.rows}
    return [Comparison(case, best, row, published_seconds(row) / published_seconds(best),
                       predicted[row.label] / predicted[best.label])
            for row in case.rows if row is not best]


def summary(comparisons: list[Comparison]) -> dict[str, int]:
    """Counts for the summary line; the excess counts only published gaps above the noise."""
    counts = Counter(comparisons=len(comparisons),
                     ranked=sum(c.ranked for c in comparisons),
                     within_2x=sum(c.gap_within_2x for c in comparisons))
    gaps = [c.excess_ratio for c in comparisons if c.excess_ratio is not None]
    counts["real_gaps"] = len(gaps)
    counts["excess_within_2x"] = sum(0.5 <= g <= 2.0 for g in gaps)
    return dict(counts)


def picks(cases: list[Case]) -> tuple[int, int]:
    """(cases whose published fastest is predicted within the model's tie band of its
    predicted fastest, cases)."""
    right = 0
    for case in cases:
        right += all(c.predicted_gap > 1 - TIE_BAND for c in compare(case))
    return right, len(cases)


def _rate(case: Case, seconds: float) -> str:
    return f"{1 / seconds:,.3g}/s" if case.higher_is_better else f"{seconds:.3g} s"


def markdown(cases: list[Case], sources: dict[str, Source]) -> str:
    """docs/planner.md's tables: per source, every configuration against the published fastest
    of its case (published number, published and predicted gap, ranked, gap within 2x)."""
    lines, everything = [], []
    for key, source in sources.items():
        own = [case for case in cases if case.source == key]
        lines += [f"#### {source.title}", "", f"- where: {source.location}",
                  f"- hardware: {source.hardware}", f"- {source.notes}", "",
                  "| case | configuration | published | gap pub. | gap pred. | ranked "
                  "| pred./pub. gap | share of the slowdown predicted |",
                  "|---|---|---|---|---|---|---|---|"]
        comparisons = []
        for case in own:
            rows = compare(case)
            comparisons += rows
            best = rows[0].best
            lines.append(f"| {case.name} | {best.label} (fastest) | {best.value:g} | 1 | 1 | "
                         "| | |")
            for c in rows:
                excess = "noise" if c.excess_ratio is None else f"{c.excess_ratio:.2f}"
                lines.append(f"| | {c.other.label} | {c.other.value:g} | {c.published_gap:.3f} "
                             f"| {c.predicted_gap:.3f} | {'yes' if c.ranked else '**no**'} | "
                             f"{c.gap_ratio:.2f} | {excess} |")
        everything += comparisons
        lines += ["", summary_line(comparisons, own), ""]
    lines.append("**All sources:** " + summary_line(everything, cases))
    return "\n".join(lines)


def summary_line(comparisons: list[Comparison], cases: list[Case]) -> str:
    counts, (right, total) = summary(comparisons), picks(cases)
    return (f"{counts['ranked']} of {counts['comparisons']} comparisons ranked as published; "
            f"{counts['within_2x']} of {counts['comparisons']} gaps within 2x (ratio of ratios); "
            f"{counts['excess_within_2x']} of {counts['real_gaps']} slowdowns above the noise "
            f"predicted to within 2x of their size; the published fastest is the model's pick "
            f"(within {100 * TIE_BAND:g} %) in {right} of {total} cases.")

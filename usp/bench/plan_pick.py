"""`usp bench plan --pick`: does the calibrated planner pick the mesh that runs fastest here?

For each case (a model and a sequence length) the planner, calibrated on this machine
(``usp.plan.calibrate``), predicts the step time of every mesh of a grid over the ranks; the
same runner as the memory check (``usp.bench.plan_check.train_records`` on each row's run spec,
with glibc's default allocator, as ``usp train`` runs) then measures each. The pick passes when its measured step is
within ``tolerance`` of the measured fastest.

With ``rounds`` > 1 every row runs once per round, the rows in turn within a round, and each
row's time is its median over the rounds: load that drifts during the case hits every row
alike, and one disturbed run does not decide the verdict.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace

from usp.bench.plan_check import Row, train_records
from usp.plan.config import check_config
from usp.plan.cost import estimate
from usp.plan.specs import ClusterSpec

logger = logging.getLogger(__name__)


def rank_cluster(cluster: ClusterSpec, ranks: int) -> ClusterSpec:
    """``cluster`` as one node of ``ranks`` ranks (the grid's world size)."""
    return replace(cluster, nodes=1, gpus_per_node=ranks)


def measured_step_seconds(row: Row, steps: int) -> float:
    """Mean step time of ``row``'s run after its first (allocating, warming) step."""
    records = train_records(row.run_spec(steps))
    timed = records[1:] or records
    return sum(r["step_time_s"] for r in timed) / len(timed)


def pick_case(rows: list[Row], cluster: ClusterSpec, steps: int, tolerance: float,
              rounds: int = 1) -> dict:
    """Predict and measure every row of one case (``rounds`` times, the median); whether the
    prediction's pick is fast enough."""
    cluster = rank_cluster(cluster, rows[0].world_size)
    predicted = []
    for row in rows:
        workload, config = row.workload(), row.config()
        problems = check_config(workload, cluster, config)
        if problems:
            raise ValueError(f"{row.label()}: the planner rejects {config.label()}: "
                             + "; ".join(problems))
        predicted.append(estimate(workload, cluster, config).step_time)
    samples: list[list[float]] = [[] for _ in rows]
    for round_ in range(rounds):
        for row, seconds, taken in zip(rows, predicted, samples):
            taken.append(measured_step_seconds(row, steps))
            logger.info("%s round %d: predicted %.2f s, measured %.2f s", row.label(),
                        round_ + 1, seconds, taken[-1])
    entries = [{"row": row.label(), "predicted_s": seconds,
                "measured_s": statistics.median(taken), "rounds_s": taken}
               for row, seconds, taken in zip(rows, predicted, samples)]
    pick = min(entries, key=lambda e: e["predicted_s"])
    fastest = min(entries, key=lambda e: e["measured_s"])
    slower = pick["measured_s"] / fastest["measured_s"] - 1
    return {"entries": entries, "pick": pick["row"], "fastest": fastest["row"],
            "pick_slower": slower, "passed": slower <= tolerance}


def format_case(case: dict) -> str:
    lines = [f"{'row':<40} {'predicted s':>11} {'measured s':>10}  rank p/m"]
    by_predicted = sorted(case["entries"], key=lambda e: e["predicted_s"])
    by_measured = sorted(case["entries"], key=lambda e: e["measured_s"])
    for entry in case["entries"]:
        lines.append(f"{entry['row']:<40} {entry['predicted_s']:>11.2f} "
                     f"{entry['measured_s']:>10.2f}  {by_predicted.index(entry) + 1}/"
                     f"{by_measured.index(entry) + 1}")
    verdict = "PASS" if case["passed"] else "FAIL"
    lines.append(f"pick {case['pick']}: {100 * case['pick_slower']:.1f}% slower than the "
                 f"measured fastest ({case['fastest']}) - {verdict}")
    return "\n".join(lines)

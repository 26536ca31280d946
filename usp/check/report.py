"""The verdict of ``usp check``: every rank's errors merged into one row per case and dtype.

A row holds the case's description, the kernel chosen, and the worst forward (out) and backward
(dq, dk, dv) error over the ranks with its bound. It fails when usp_attention raised, when any
rank's error exceeds its bound (a NaN does too), or when the single-device computation the bound
comes from is itself off (then the kernel alone is wrong on this device, and the row says so).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from usp.check.cases import CheckCase

NAMES = ("out", "dq", "dk", "dv")


@dataclass
class CheckReport:
    """The rows (dicts, see :func:`merge_rows`) and where they ran."""

    rows: list[dict] = field(default_factory=list)
    world_size: int = 1
    device: str = "cpu"
    backend: str = "none"
    seconds: float = 0.0

    @property
    def failures(self) -> list[dict]:
        return [row for row in self.rows if not row["ok"]]

    @property
    def cases(self) -> int:
        return len({row["index"] for row in self.rows})

    def to_json(self) -> dict:
        return asdict(self)


def _worst(pairs_per_rank: list[tuple[int, list[tuple[float, float]]]], names: tuple[str, ...]):
    """The ``(error, bound, name, rank)`` with the largest error / bound (a NaN is the worst)."""
    worst = None
    for rank, pairs in pairs_per_rank:
        for name, (error, bound) in zip(names, pairs):
            ratio = math.inf if math.isnan(error) else error / bound
            if worst is None or ratio > worst[0]:
                worst = (ratio, error, bound, name, rank)
    return worst[1:]


def merge_rows(case: CheckCase, dtype_names: tuple[str, ...],
               per_rank: list[list[dict]]) -> list[dict]:
    """One row per dtype from every rank's results for ``case`` (identical on every rank)."""
    rows = []
    for position, dtype in enumerate(dtype_names):
        results = [(rank, ranks_rows[position]) for rank, ranks_rows in enumerate(per_rank)]
        row = {
            "index": case.index, "ring": case.ring, "ulysses": case.ulysses, "dp": case.dp,
            "placement": case.placement, "layout": case.layout, "dtype": dtype,
            "heads": case.heads, "kv_heads": case.kv_heads, "seq_len": case.seq_len,
            "slots": case.slots, "head_dim": case.head_dim, "batch": case.batch,
            "mask": case.describe_mask(), "causal": case.causal, "seed": case.seed,
            "description": str(case),
        }
        problems = [f"rank {rank}: {result['problem']}" for rank, result in results
                    if "problem" in result]
        if problems:
            rows.append({**row, "ok": False, "kernel": "-", "problem": problems[0],
                         "forward": None, "backward": None, "single_device": None})
            continue
        kernels = sorted({result["kernel"] for _, result in results})
        forward = _worst([(rank, r["usp"][:1]) for rank, r in results], NAMES[:1])
        backward = _worst([(rank, r["usp"][1:]) for rank, r in results], NAMES[1:])
        single = None
        if results[0][1]["single"] is not None:
            single = _worst([(rank, r["single"]) for rank, r in results], NAMES)
        problem = None
        for error, bound, name, rank in (forward, backward):
            if not error <= bound:
                problem = f"{name} error {error:.3g} > bound {bound:.3g} on rank {rank}"
                break
        if problem is None and single is not None and not single[0] <= single[1]:
            error, bound, name, rank = single
            problem = (f"the single-device {name} error {error:.3g} > {bound:.3g} (a multiple of "
                       f"the textbook attention's in {dtype}) on rank {rank}: the kernel or "
                       "mask is wrong even on one device")
        rows.append({**row, "ok": problem is None, "kernel": "/".join(kernels),
                     "problem": problem,
                     "forward": {"error": forward[0], "bound": forward[1]},
                     "backward": {"error": backward[0], "bound": backward[1],
                                  "worst": backward[2]},
                     "single_device": None if single is None else {
                         "error": single[0], "bound": single[1], "worst": single[2]}})
    return rows

"""What the benchmarks measure and the names their command line offers, torch-free: ``usp bench
... --help`` shows them without importing torch; the benchmark modules import them from here."""

from __future__ import annotations

from dataclasses import dataclass

MASKS = ("dense", "packed", "window")  # usp bench attention --mask: usp.bench.masks builds them

# usp bench plan: the meshes a row can name (degrees of dp, tp, pp, ring, ulysses); the check's
# grid is the six over 4 ranks, the 2-rank ones serve the quick test (usp.bench.plan_check)
PLAN_MESHES = {
    "uly4": dict(ulysses=4), "ring2xuly2": dict(ring=2, ulysses=2),
    "tp2xring2": dict(tp=2, ring=2), "dp2xuly2": dict(dp=2, ulysses=2),
    "pp2xring2": dict(pp=2, ring=2), "pp2xtp2": dict(pp=2, tp=2),
    "uly2": dict(ulysses=2), "ring2": dict(ring=2), "tp2": dict(tp=2), "pp2": dict(pp=2),
    "dp2": dict(dp=2),
}
PLAN_GRID_MESHES = ("uly4", "ring2xuly2", "tp2xring2", "dp2xuly2", "pp2xring2", "pp2xtp2")


@dataclass
class DecodeBench:
    """What ``usp bench decode`` measures (the CLI's flags; usp.bench.decode)."""

    nproc: int = 4
    ring: int = 2
    ulysses: int = 2
    layout: str = "zigzag"
    model: str = "tiny"
    cache_lengths: tuple[int, ...] = (256, 1024, 4096)
    steps: int = 8
    crossover_total: int = 2048
    crossover_new: tuple[int, ...] = (16, 128, 512, 1024, 2048)

"""`usp bench train`: per-rank memory and throughput of real training steps at SP = 1, 2, 4.

Each configuration is a fresh ``usp train`` run (own rank processes, synthetic tokens) at the same
total sequence length. Per rank it reports the step's peak memory, the memory held at the start
of a step (model + optimizer state + sharded parameters: the baseline) and their difference, the
activation part, which sequence parallelism divides by SP. Tokens/s of every configuration are
compared with one rank's.

``--find-max-seq`` doubles the sequence length for 1 rank and for 4 ranks until a step exceeds
``--max-step-s``; from the measured peaks it fits ``total peak = a + b * S`` (memory is linear in
S: the attention kernels keep O(S) state) and reports where that meets the machine's memory.
"""

from __future__ import annotations

import logging
import tempfile

logger = logging.getLogger(__name__)

MIB = 2**20
DEFAULT_GRID = ("1x1", "1x2", "2x2")  # RING x ULYSSES: SP = 1, 2, 4


def parse_grid(grid: list[str]) -> list[tuple[int, int]]:
    degrees = []
    for item in grid:
        ring, _, ulysses = item.partition("x")
        if not (ring.isdigit() and ulysses.isdigit()):
            raise ValueError(f"--grid entry {item!r} must be RINGxULYSSES, e.g. 2x2")
        degrees.append((int(ring), int(ulysses)))
    return degrees


def measure(args, ring: int, ulysses: int, seq_len: int, steps: int,
            overrides: dict | None = None) -> dict:
    """Train ``steps`` steps on ring x ulysses (x tp) fresh ranks; summarise the steps after the
    first. ``overrides``: further settings of the run spec (memory features, ``tp``)."""
    from usp.spec import RunSpec
    from usp.training.launcher import launch_elastic
    from usp.training.setup import validate

    with tempfile.TemporaryDirectory(prefix="usp-bench-train-") as out:
        spec = RunSpec.from_flat(dict(
            model=args.model, seq_len=seq_len, steps=steps, ring=ring, ulysses=ulysses,
            layout=args.layout, dtype=args.dtype, synthetic=True, out=out, progress=False,
            nproc=ring * ulysses * (overrides or {}).get("tp", 1), warmup=1, ckpt_every=0,
            **(overrides or {}),
        ))
        validate(spec, spec.nproc)
        records = launch_elastic(spec)
    measured = records[1:] or records
    world = spec.nproc
    peak = [max(r["peak_memory_bytes"][rank] for r in measured) for rank in range(world)]
    base = [max(r["memory_before_step_bytes"][rank] for r in measured) for rank in range(world)]
    activation = [
        max(r["peak_memory_bytes"][rank] - r["memory_before_step_bytes"][rank] for r in measured)
        for rank in range(world)
    ]
    return {
        "ring": ring, "ulysses": ulysses, "sp": ring * ulysses, "seq_len": seq_len,
        "peak_mib": [p / MIB for p in peak], "base_mib": [b / MIB for b in base],
        "activation_mib": [a / MIB for a in activation],
        "saved_mib": [
            max(r["saved_activation_bytes"][rank] for r in measured) / MIB for rank in range(world)
        ],
        "tokens_per_s": sum(r["tokens_per_s"] for r in measured) / len(measured),
        "step_time_s": sum(r["step_time_s"] for r in measured) / len(measured),
        # only against a stated peak (a known GPU's datasheet), and only when plausible (<= 1)
        "mfu": (sum(r["mfu"] for r in measured) / len(measured)
                if all("mfu" in r for r in measured) else None),
    }


def format_grid(results: list[dict]) -> str:
    one = next((r for r in results if r["sp"] == 1), results[0])
    lines = [
        "per rank, MiB: peak = baseline (model, optimizer) + activation part (peak - baseline);"
        " saved = tensors autograd keeps for the backward",
        f"{'ring x ulysses':>14} {'SP':>3} {'peak':>7} {'baseline':>9} {'activation':>11} "
        f"{'vs SP=1':>8} {'saved':>7} {'vs SP=1':>8} {'ideal':>6} {'tokens/s':>9} {'vs SP=1':>8}",
    ]
    for r in results:
        activation, saved = max(r["activation_mib"]), max(r["saved_mib"])
        lines.append(
            f"{r['ring']:>6} x {r['ulysses']:<6} {r['sp']:>3} {max(r['peak_mib']):>7.0f} "
            f"{max(r['base_mib']):>9.0f} {activation:>11.0f} "
            f"{activation / max(one['activation_mib']):>8.2f} {saved:>7.0f} "
            f"{saved / max(one['saved_mib']):>8.2f} {1 / r['sp']:>6.2f} "
            f"{r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / one['tokens_per_s']:>7.2f}x"
        )
    return "\n".join(lines)


def machine_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ValueError("/proc/meminfo has no MemTotal line; this search needs Linux")


def find_max_seq(args, ring: int, ulysses: int) -> dict:
    """Double S while a step stays under ``--max-step-s``; extrapolate memory to the machine's."""
    points, seq_len = [], args.search_start
    while True:
        result = measure(args, ring, ulysses, seq_len, steps=1)
        points.append(result)
        logger.info(
            "SP=%d: S=%d: %.1f s/step, peak over all ranks %.0f MiB",
            result["sp"], seq_len, result["step_time_s"], sum(result["peak_mib"]),
        )
        # attention is O(S^2): the next doubling costs about 4x this step
        if len(points) >= 2 and 4 * result["step_time_s"] > args.max_step_s:
            break
        seq_len *= 2
    # least squares through (S, peak over all ranks): peak = intercept + per_token * S
    xs = [p["seq_len"] for p in points]
    ys = [sum(p["peak_mib"]) * MIB for p in points]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    per_token = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sum(
        (x - x_mean) ** 2 for x in xs
    )
    intercept = y_mean - per_token * x_mean
    memory = machine_memory_bytes()
    return {
        "sp": ring * ulysses, "longest_measured": xs[-1], "points": points,
        "bytes_per_token_all_ranks": per_token, "intercept_bytes": intercept,
        "memory_limit_seq_len": int((memory - intercept) / per_token),
        "machine_memory_gib": memory / 2**30,
    }

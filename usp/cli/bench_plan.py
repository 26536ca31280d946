"""``usp bench plan``: the planner against real ``usp train`` steps on this machine."""

from __future__ import annotations

import itertools
import json
import time

from usp.bench.options import PLAN_GRID_MESHES, PLAN_MESHES
from usp.cli.help import add_parser

DESCRIPTION = """\
The planner's predictions against real usp train runs on this machine (spawned gloo ranks): the
per-rank peak memory of each model, length, mesh and checkpointing, and whether the calibrated
planner picks the mesh that runs fastest. Each run is the planner's configuration, written as a
run spec. See docs/planner.md.

    usp bench plan                          # memory: predicted vs measured per-rank peak
    usp bench plan --grid full              # every model x length x mesh x checkpointing
    usp bench plan --features               # memory, each memory feature of usp train
    usp bench plan --pick                   # does the calibrated planner pick the fastest?
"""


def register_plan(bench_subparsers) -> None:
    parser = add_parser(
        bench_subparsers, "plan", help="the planner's memory and pick against real usp train runs",
        description=DESCRIPTION,
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "small"],
                        help="presets of usp.models to run")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096],
                        help="sequence lengths, taken in turn (or all, with --grid full)")
    parser.add_argument("--meshes", nargs="+", default=list(PLAN_GRID_MESHES),
                        choices=list(PLAN_MESHES),
                        help="the 4-D meshes to run (degrees of dp, tp, pp, ring, ulysses)")
    parser.add_argument("--ac", nargs="+", default=["none", "full"],
                        choices=["none", "full", "selective"],
                        help="activation checkpointing of the runs")
    parser.add_argument("--grid", choices=["cover", "full"], default="cover",
                        help="cover: every model, mesh and --ac once, the lengths taken in "
                        "turn (each length, mesh and --ac appears); full: the whole product")
    parser.add_argument("--steps", type=int, default=2, help="steps per run (the last is read)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--pick: run every mesh this many times, in turn, and take each "
                        "one's median step time")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="memory: allowed |predicted/measured - 1|; --pick: allowed "
                        "slowdown of the pick (default 0.15 memory, 0.05 pick)")
    parser.add_argument("--pick", action="store_true",
                        help="calibrate, predict each mesh's step time, run them all, "
                        "compare the pick with the measured fastest (one case per model x length)")
    parser.add_argument("--features", action="store_true",
                        help="memory: instead of the mesh grid, each memory feature of usp "
                        "train (chunked and vocab_parallel loss, tiled MLP, attention "
                        "checkpointing, gradient accumulation) on a mesh, per model, the "
                        "lengths taken in turn")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.set_defaults(func=run)


def rows(args) -> list:
    """The runs of the grid (``usp.bench.plan_check.Row``)."""
    from usp.bench import plan_check

    if args.features:
        lengths = itertools.cycle(args.seq_lens)
        return [plan_check.Row(m, next(lengths), mesh, ac, 1, loss, tile, accum)
                for m in args.models for mesh, ac, loss, tile, accum in plan_check.FEATURES]
    if args.grid == "full":
        return [plan_check.Row(m, s, mesh, ac) for m, s, mesh, ac in itertools.product(
            args.models, args.seq_lens, args.meshes, args.ac)]
    lengths = itertools.cycle(args.seq_lens)
    return [plan_check.Row(m, next(lengths), mesh, ac)
            for m, ac, mesh in itertools.product(args.models, args.ac, args.meshes)]


def run(args) -> int:
    if args.pick:
        return _run_pick(args)
    from usp.bench import plan_check

    started = time.perf_counter()
    grid = rows(args)
    runtime = {}
    results = []
    for row in grid:
        key = tuple(row.degrees().items())
        if key not in runtime:
            runtime[key] = plan_check.runtime_bytes(row.degrees())
        results.append(plan_check.check_row(row, runtime[key], args.steps))
        print(plan_check.format_table(results[-1:], args.tolerance).splitlines()[-1], flush=True)
    print()
    print(plan_check.format_table(results, args.tolerance))
    misses = [r for r in results if abs(r["predicted"] / r["measured"] - 1) > args.tolerance]
    print(f"\n{len(results) - len(misses)}/{len(results)} rows within ±{args.tolerance:.0%} "
          f"of the measured per-rank peak ({time.perf_counter() - started:.0f} s; MiB; p/m = "
          "predicted/measured; runtime = a bare rank, measured)")
    _write_json(args.json, results)
    return 0 if not misses else 1


def _run_pick(args) -> int:
    from usp.bench import plan_check, plan_pick
    from usp.plan import calibrate
    from usp.plan.presets import cpu_cluster

    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds} must be >= 1")

    tolerance = args.tolerance if args.tolerance != 0.15 else 0.05
    ranks = {plan_check.Row(args.models[0], args.seq_lens[0], mesh, args.ac[0]).world_size
             for mesh in args.meshes}
    if len(ranks) != 1:
        raise ValueError(f"--meshes span world sizes {sorted(ranks)}; pick meshes of one size")
    cluster = calibrate.calibrated(cpu_cluster(), calibrate.measure(ranks.pop()))
    print(f"calibrated: {cluster.peak_tflops * 1e3:.1f} GFLOPS GEMM, attention efficiency "
          f"{cluster.attention_efficiency:.2f}, gloo {cluster.intra_bandwidth_gbs:.2f} GB/s and "
          f"{cluster.intra_latency_us:.0f} us per rank with all sending, "
          f"{cluster.sync_us:.0f} us more per collective between compute, "
          f"{cluster.cores_per_node:g} cores")
    cases = []
    for model, seq_len in itertools.product(args.models, args.seq_lens):
        grid = [plan_check.Row(model, seq_len, mesh, ac)
                for mesh, ac in itertools.product(args.meshes, args.ac)]
        case = plan_pick.pick_case(grid, cluster, max(args.steps, 2), tolerance, args.rounds)
        cases.append(case)
        print(f"\n{model} S={seq_len}\n{plan_pick.format_case(case)}", flush=True)
    passed = sum(case["passed"] for case in cases)
    print(f"\npick within {tolerance:.0%} of the measured fastest in {passed}/{len(cases)} cases")
    _write_json(args.json, cases)
    return 0 if passed >= 0.9 * len(cases) else 1


def _write_json(path: str | None, results: list[dict]) -> None:
    if path:
        with open(path, "w") as out:
            json.dump(results, out, indent=2)

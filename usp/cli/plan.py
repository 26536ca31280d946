"""``usp plan``: pick the parallel configuration for a model, sequence length, batch and cluster;
cost a run spec; write the pick as a run spec ``usp train --config`` runs."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from pathlib import Path

from usp.cli.help import add_parser
from usp.plan.config import ParallelConfig, check_config
from usp.plan.presets import CLUSTERS, MODELS, cpu_cluster, get_cluster, get_model
from usp.plan.specs import GIB, PRECISIONS, ClusterSpec, Workload, parse_count

DESCRIPTION = """\
Rank every dp x tp x pp x ring x ulysses configuration usp train runs (with ZeRO stage,
placement, micro-batches and the memory features: activation checkpointing, chunked or
vocab_parallel loss, tiled MLP) of a model, sequence length and batch on a cluster by a cost
model of memory, communication and time, and explain the pick. A plan uses at most the memory
per GPU minus --reserved-gib and --headroom. Configurations use the run spec's names (usp
train's flags). See docs/planner.md and docs/cost-model.md.

    usp plan --model llama3-8b --seq-len 208k --global-batch 1 --cluster a800x8 --nodes 2
    usp plan --list                                      # the model and cluster presets
    usp plan ... --fix ring=1                            # only pure-Ulysses configurations
    usp plan ... --config ring=2,ulysses=8,zero=3,ac=full  # one configuration in detail
    usp plan --config run.toml --cluster a800x8          # cost a run spec
    usp plan ... --emit run.toml                         # write the pick for usp train --config
    usp plan --model tiny --seq-len 4k --cluster cpu --calibrate
"""
# what a plan assumes for what neither a flag nor a --config run spec gives
DEFAULT_WORKLOAD = {"model": "llama3-8b", "seq_len": "32k", "global_batch": 1}

# flag -> (ClusterSpec field it overrides, its type, what it is)
CLUSTER_FLAGS = {
    "gpus_per_node": (int, "GPUs per node"),
    "peak_tflops": (float, "peak dense bf16 TFLOPS per GPU"),
    "memory_gib": (float, "memory per GPU, GiB"),
    "intra_bandwidth_gbs": (float, "GB/s a GPU sends inside a node, one direction"),
    "inter_bandwidth_gbs": (float, "GB/s a GPU sends across nodes, one direction"),
    "intra_latency_us": (float, "latency of one message inside a node, us"),
    "inter_latency_us": (float, "latency of one message across nodes, us"),
    "hbm_bandwidth_gbs": (float, "device memory bandwidth, GB/s"),
    "matmul_efficiency": (float, "fraction of the peak large GEMMs reach"),
    "attention_efficiency": (float, "fraction of the peak the attention kernel reaches"),
    "reserved_gib": (float, "GiB per GPU no step can use: CUDA context, communicator buffers"),
    "headroom": (float, "fraction of the memory a plan leaves free beside --reserved-gib: the "
                 "allocator's fragmentation, workspaces, what the model leaves out"),
    "cores_per_node": (float, "CPU clusters: cores a node's ranks share"),
    "attention_overhead_keys": (float, "fixed work per query row of one attention kernel call, "
                                "in keys (rows meeting this many keys run at half rate)"),
    "launch_us": (float, "host time to launch one device operation, us"),
    "sync_us": (float, "CPU clusters: what one collective call adds beyond its latency, us"),
}


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "plan",
        help="choose dp/tp/pp/ring/ulysses/ZeRO for a model and cluster by a cost model",
        description=DESCRIPTION,
    )
    parser.add_argument("--model",
                        help="a preset (see --list) or a Hugging Face config.json (or its "
                        "folder) (default: --config's run spec's, else llama3-8b)")
    parser.add_argument("--seq-len",
                        help="tokens per sequence: 8192, 208k, 1m (k = 1024) (default: "
                        "--config's run spec's, else 32k)")
    parser.add_argument("--global-batch", type=int,
                        help="sequences per optimizer step (default: --config's run spec's, "
                        "else 1)")
    parser.add_argument("--dtype", choices=("auto", *PRECISIONS), default="auto",
                        help="usp train's --dtype: bf16 mixed precision or fp32 (default auto: "
                        "fp32 on --cluster cpu, bf16 on GPUs, or --config's run spec's)")
    parser.add_argument("--non-causal", action="store_true",
                        help="full (bidirectional) attention (default: causal)")
    parser.add_argument("--cluster", default="a800x8", help="cluster preset (see --list)")
    parser.add_argument("--nodes", type=int, help="number of nodes (default: the preset's)")
    for name, (kind, what) in CLUSTER_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind,
                            help=f"{what} (default: the --cluster preset's)")
    parser.add_argument("--top", type=int, default=10, help="rows of the ranking to print")
    parser.add_argument("--fix", default="",
                        help="only configurations with these fields (the run spec's names), "
                        "e.g. tp=1,pp=1, ring=1 or loss=chunked (default: none fixed)")
    parser.add_argument("--config", metavar="RUN.TOML|KEY=VALUE,...",
                        help="cost one configuration: a run spec (usp train --config's TOML; "
                        "--model, --seq-len, --global-batch and --dtype given beside it "
                        "override its) or fields, e.g. ring=2,ulysses=8,zero=3,ac=full "
                        "(default: rank them all)")
    parser.add_argument("--emit", metavar="RUN.TOML",
                        help="write the pick (or --config's configuration) as a run spec for "
                        "usp train --config, and print the commands that run it")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--calibrate", action="store_true",
                        help="with --cluster cpu: measure this machine (GEMM, attention, gloo) "
                        "and plan for it")
    parser.add_argument("--list", action="store_true", help="list model and cluster presets")
    parser.set_defaults(func=run)


def _cluster(args) -> ClusterSpec:
    overrides = {name: getattr(args, name) for name in CLUSTER_FLAGS}
    cluster = get_cluster(args.cluster, nodes=args.nodes, **overrides)
    if args.calibrate:
        if args.cluster != "cpu":
            raise ValueError(
                f"--calibrate measures this machine; use --cluster cpu, not {args.cluster!r}"
            )
        from usp.plan import calibrate as calibration  # torch: it runs kernels and gloo ranks

        cluster = calibration.calibrated(cluster, calibration.measure(cluster.gpus_per_node))
    return cluster


def _row(rank: int, cost, tied: bool) -> list[str]:
    c = cost.config
    exposed = cost.step_time - cost.time["compute"] - cost.time["bubble"] - cost.time["optimizer"]
    tp = f"{c.tp}{'-sp' if c.tp > 1 and c.tp_sequence_parallel else ''}"
    return [f"{rank}{'=' if tied else ''}", str(c.dp), tp, str(c.pp), str(c.ring),
            str(c.ulysses), str(c.zero), str(c.microbatches) if c.pp > 1 else "-",
            str(c.grad_accum), c.ac, c.loss, str(c.tiled_mlp) if c.tiled_mlp else "-",
            c.placement if c.ring > 1 and c.ulysses > 1 else "-",
            f"{cost.memory_total / GIB:.1f}", f"{cost.step_time:.3f}",
            f"{cost.tokens_per_second:,.0f}", f"{100 * cost.mfu:.1f}%", f"{exposed:.3f}"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


HEADER = ["#", "dp", "tp", "pp", "ring", "uly", "zero", "mb", "accum", "ac", "loss",
          "tiled mlp", "placement", "mem GiB", "step s", "tokens/s", "MFU", "exposed s"]


def _details(cost) -> list[str]:
    memory = ", ".join(f"{k} {v / GIB:.2f}" for k, v in cost.memory.items())
    traffic = ", ".join(f"{kind} {link} {sent / 1e9:.2f}"
                        for (kind, link), sent in sorted(cost.comm_bytes.items()))
    times = ", ".join(f"{k} {v:.3f}" for k, v in cost.time.items() if v)
    return [f"  memory per GPU (GiB): {memory}; total {cost.memory_total / GIB:.2f} of "
            f"{cost.usable_memory / GIB:.2f} usable",
            f"  sent per GPU per step (GB): {traffic or 'nothing'}",
            f"  time (s): {times}; step {cost.step_time:.3f}, MFU {100 * cost.mfu:.1f}%"]


def _as_json(cost) -> dict:
    return {
        "config": asdict(cost.config), "label": cost.config.label(), "fits": cost.fits,
        "step_time_s": cost.step_time, "tokens_per_s": cost.tokens_per_second, "mfu": cost.mfu,
        "memory_bytes": {**cost.memory, "total": cost.memory_total, "usable": cost.usable_memory},
        "memory_features": list(cost.config.memory_features),
        "comm_bytes": [{"kind": kind, "link": link, "bytes": sent}
                       for (kind, link), sent in cost.comm_bytes.items()],
        "time_s": cost.time,
        "links": {axis: "intra" if p.intra_node else "inter" for axis, p in cost.placements.items()
                  if p.size > 1},
    }


def _print_presets() -> None:
    print("models:")
    for m in MODELS.values():
        size = (f"{m.total_params / 1e9:.2f}B" if m.total_params >= 1e9
                else f"{m.total_params / 1e6:.1f}M")
        print(f"  {m.name:12s} {size:>7s}  layers {m.layers}, hidden {m.hidden}, "
              f"heads {m.q_heads}/{m.kv_heads} kv, head_dim {m.head_dim}, ffn {m.ffn_hidden}, "
              f"vocab {m.vocab}{', tied' if m.tied_embeddings else ''}")
    print("  (or a path to a Hugging Face config.json)")
    print("clusters (per GPU; bandwidth one direction):")
    for c in [*CLUSTERS.values(), cpu_cluster()]:
        print(f"  {c.name:8s} {c.nodes}x{c.gpus_per_node}, {c.peak_tflops:g} TFLOPS, "
              f"{c.memory_gib:g} GiB, intra {c.intra_bandwidth_gbs:g} GB/s, "
              f"inter {c.inter_bandwidth_gbs:g} GB/s, "
              f"latency {c.intra_latency_us:g}/{c.inter_latency_us:g} us")


def run(args) -> int:
    if args.list:
        _print_presets()
        return 0
    if args.top < 1:
        raise ValueError(f"--top {args.top} must be at least 1")
    from usp.plan import spec_io
    from usp.plan.planner import TIE_BAND, explain, plan  # the cost model imports usp.comm

    cluster = _cluster(args)
    if args.config and _is_spec(args.config):
        config, workload, base = _read_spec(args, cluster)
        return _run_one(workload, cluster, config, args, base, model={})
    workload = _workload(args, cluster)
    # the model a spec can name, checked before any costing
    model = spec_io.model_settings(_model_name(args)) if args.emit else {}
    if args.config:
        return _run_one(workload, cluster, ParallelConfig.parse(args.config), args, None, model)
    result = plan(workload, cluster, ParallelConfig.parse_fields(args.fix))
    best, reasons = result.best, explain(result)
    if args.json:
        workload_json = {"model": asdict(workload.model), "seq_len": workload.seq_len,
                         "global_batch": workload.global_batch, "causal": workload.causal,
                         "dtype": workload.dtype}
        print(json.dumps({"workload": workload_json, "cluster": asdict(cluster),
                          "best": _as_json(best), "reasons": reasons,
                          "tie_band": TIE_BAND, "tied": result.tied,
                          "top": [_as_json(c) for c in result.ranked[:args.top]],
                          "counted": _counts(result)}, indent=2))
    else:
        print(f"{workload.model.name}, {workload.seq_len:,} tokens x {workload.global_batch} "
              f"({workload.dtype}) on {cluster.name} {cluster.nodes}x{cluster.gpus_per_node}: "
              f"{_counts(result)}")
        print(f"memory budget per GPU: {cluster.budget()}")
        print(_table(HEADER, [_row(i + 1, c, i < result.tied and result.tied > 1)
                              for i, c in enumerate(result.ranked[:args.top])]))
        if result.tied > 1:
            print(f"(= marks the {result.tied} configurations predicted within "
                  f"{100 * TIE_BAND:g}% of the fastest: a tie, ordered by memory features, "
                  "then memory; see why)")
        print(f"\nbest: {best.config.label()}")
        print("\n".join(_details(best)))
        print("why:")
        print("\n".join(f"  - {reason}" for reason in reasons))
    if args.emit:
        _emit(args.emit, best, workload, cluster, None, model, args.json)
    return 0


def _model_name(args) -> str:
    return args.model or DEFAULT_WORKLOAD["model"]


def _workload(args, cluster: ClusterSpec) -> Workload:
    from usp.plan.spec_io import default_dtype

    return Workload(get_model(_model_name(args)),
                    parse_count(args.seq_len or DEFAULT_WORKLOAD["seq_len"]),
                    args.global_batch or DEFAULT_WORKLOAD["global_batch"],
                    causal=not args.non_causal,
                    dtype=default_dtype(cluster) if args.dtype == "auto" else args.dtype)


def _is_spec(config: str) -> bool:
    """``--config``'s value names a run spec (a TOML file) rather than key=value fields."""
    return config.endswith(".toml") or Path(config).is_file()


def _read_spec(args, cluster: ClusterSpec):
    """The configuration, workload and spec of ``--config run.toml``, with the workload flags
    given beside it applied to the spec (as usp train applies flags given beside --config)."""
    from usp.plan import spec_io
    from usp.spec import RunSpec, read_toml

    if args.non_causal:
        raise ValueError("--non-causal with a run spec: usp train trains causal language models")
    spec = RunSpec.from_flat(read_toml(args.config))
    changes = {}
    if args.model:
        changes.update(spec_io.model_settings(args.model))
    if args.seq_len:
        changes["seq_len"] = parse_count(args.seq_len)
    if args.global_batch:
        changes["global_batch"] = args.global_batch
    if args.dtype != "auto":
        changes["dtype"] = args.dtype
    spec = spec.replace(**changes)
    config, workload = spec_io.from_run_spec(spec, cluster)
    return config, workload, spec


def _counts(result) -> dict[str, int]:
    return {"fit": len(result.ranked), "too_big": len(result.too_big),
            "invalid": len(result.invalid)}


def _run_one(workload: Workload, cluster: ClusterSpec, config: ParallelConfig, args, base,
             model: dict) -> int:
    problems = check_config(workload, cluster, config)
    if problems:
        raise ValueError(f"{config.label()} is invalid: " + "; ".join(problems))
    from usp.plan.cost import estimate

    cost = estimate(workload, cluster, config)
    if args.json:
        print(json.dumps(_as_json(cost), indent=2))
    else:
        print(f"{workload.model.name}, {workload.seq_len:,} tokens x {workload.global_batch} "
              f"({workload.dtype}): {config.label()} on {cluster.name} "
              f"{cluster.nodes}x{cluster.gpus_per_node}{'' if cost.fits else ' - DOES NOT FIT'}")
        print(f"memory budget per GPU: {cluster.budget()}")
        print("\n".join(_details(cost)))
    if args.emit:
        _emit(args.emit, cost, workload, cluster, base, model, args.json)
    return 0 if cost.fits else 1


def _emit(path: str, cost, workload: Workload, cluster: ClusterSpec, base, model: dict,
          quiet: bool) -> None:
    """Write ``cost``'s configuration as a run spec at ``path``; say how to run it."""
    from usp.plan import spec_io
    from usp.spec import to_toml

    if not cost.fits:
        raise ValueError(f"--emit: {cost.config.label()} does not fit in {cluster.budget()} "
                         "per GPU; no run spec written")
    spec = spec_io.to_run_spec(cost.config, workload, cluster, model, base)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(path).write_text(to_toml(spec, spec_io.header(cost, workload, cluster, today)),
                          encoding="utf-8")
    if not quiet:
        print(f"\nwrote {path}; run it with")
        print("\n".join(f"  {line}" for line in spec_io.launch_commands(path, cluster)))

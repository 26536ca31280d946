"""``usp bench``: the attention, training and decode benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from usp.bench import training
from usp.bench.options import MASKS, DecodeBench
from usp.choices import LAYOUTS
from usp.cli.bench_plan import register_plan
from usp.cli.bench_trainer import register_trainer
from usp.cli.help import add_parser

# CPU defaults are the peers' comparison shape; CUDA defaults Llama-3-8B's attention
SHAPE_DEFAULTS = {
    "cpu": {"heads": 8, "head_dim": 64, "dtype": "fp32"},
    "cuda": {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bf16"},
}


def register(subparsers) -> None:
    bench = add_parser(
        subparsers, "bench", help="benchmarks measured in one run",
        description="Benchmarks of usp measured in one run on this machine: attention "
        "(efficiency against one process, load balance, one GPU), training steps (memory and "
        "tokens/s), decode (latency and KV-cache bytes) and the planner against real runs.",
    )
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="BENCHMARK")
    attention = add_parser(
        kinds, "attention", help="ring, ulysses and usp attention on N spawned CPU ranks",
        description="Ring, Ulysses and USP attention, forward and forward+backward, on --nproc "
        "spawned CPU ranks against one process and the ceiling of N ranks sharing the cores; "
        "or, with --device cuda, the kernels and one rank of a ring played alone on one GPU. "
        "See docs/attention.md and docs/gpu.md.",
    )
    attention.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                           help="cpu: --nproc gloo ranks; cuda: one GPU, one rank of a ring "
                           "played alone (see docs/gpu.md)")
    attention.add_argument("--nproc", type=int, default=4, help="ranks to spawn (gloo)")
    attention.add_argument("--seq-len", type=int, default=8192,
                           help="cpu: tokens of the whole sequence, split over the ranks")
    attention.add_argument("--heads", type=int, default=None, help="default: 8 (cpu), 32 (cuda)")
    attention.add_argument("--kv-heads", type=int, default=None,
                           help="default: --heads (cpu), 8 (cuda)")
    attention.add_argument("--head-dim", type=int, default=None,
                           help="default: 64 (cpu), 128 (cuda)")
    attention.add_argument("--batch", type=int, default=1, help="sequences per call")
    attention.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp64"], default=None,
                           help="default: fp32 (cpu), bf16 (cuda)")
    attention.add_argument("--ring-size", type=int, default=4,
                           help="cuda: the size of the ring whose last rank is measured")
    attention.add_argument("--tokens-per-rank", type=int, nargs="+", default=[8192, 16384, 32768],
                           help="cuda: tokens each rank holds")
    attention.add_argument("--kernels", nargs="+", default=None,
                           help="cuda: kernels to measure (default: every one that works)")
    attention.add_argument("--json", default=None, metavar="FILE", help="cuda: also write JSON")
    attention.add_argument("--no-causal", dest="causal", action="store_false",
                           help="full (bidirectional) attention instead of causal")
    attention.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    attention.add_argument("--iters", type=int, default=3, help="timed calls per measurement")
    attention.add_argument("--warmup", type=int, default=1, help="untimed calls before each")
    attention.add_argument("--mask", choices=MASKS[1:], default=None,
                           help="cpu: also run every configuration under this mask (packed: one "
                           "document of S/2 and many of S/64-S/16; window: --window tokens) and "
                           "compare work, time and bytes with dense causal")
    attention.add_argument("--window", type=int, default=4096,
                           help="tokens a query sees under --mask window, itself included")
    attention.add_argument("--breakdown", action="store_true",
                           help="cpu: where rank 0's time goes in one call, by usp's labels")
    attention.add_argument("--rounds", type=int, default=3,
                           help="cpu: rounds of reference, ceiling and every configuration; "
                           "each figure is the median over rounds")
    attention.add_argument("--modes", nargs="+", default=["ring", "ulysses", "usp"],
                           choices=["ring", "ulysses", "usp"],
                           help="cpu: which sequence-parallel attentions to measure")
    attention.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                           help="cpu: token layouts of ring and usp")
    attention.add_argument("--head-chunks", nargs="+", type=int, default=[1],
                           help="cpu: Ulysses and USP also with their heads in these many "
                           "overlapped chunks (usp_attention's head_chunks)")
    attention.set_defaults(func=_run_attention)
    register_train(kinds)
    register_decode(kinds)
    register_plan(kinds)
    register_trainer(kinds)


def _with_device_defaults(args) -> None:
    for name, value in SHAPE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    for name in ("heads", "kv_heads", "head_dim", "batch", "seq_len", "ring_size", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")


def _run_device_attention(args) -> int:
    from usp.bench.attention_device import DeviceShape, run_device_benchmark
    from usp.cli.bench_tables import format_device_report

    if args.dtype == "fp64":
        raise ValueError("--device cuda measures fp16, bf16 or fp32 kernels, not fp64")
    shape = DeviceShape(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        batch=args.batch, dtype=args.dtype, ring_size=args.ring_size,
                        iters=args.iters, warmup=args.warmup)
    report = run_device_benchmark(shape, args.tokens_per_rank, args.kernels)
    print(format_device_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _run_attention(args) -> int:
    _with_device_defaults(args)
    if args.device == "cuda":
        return _run_device_attention(args)
    from usp.bench.attention import BenchShape, configurations, run_benchmark
    from usp.cli.bench_tables import format_breakdown, format_result

    shape = BenchShape(
        seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, batch=args.batch, dtype=args.dtype, causal=args.causal,
        threads=args.threads, iters=args.iters, warmup=args.warmup, rounds=args.rounds,
        window=args.window,
    )
    masks = ("dense",) if args.mask is None else ("dense", args.mask)
    configs = configurations(args.nproc, args.modes, args.layouts, masks,
                             tuple(args.head_chunks))
    result = run_benchmark(shape, args.nproc, configs, args.breakdown)
    print(format_result(shape, args.nproc, result))
    if args.breakdown:
        print(format_breakdown(result))
    return 0


def register_train(bench_subparsers) -> None:
    parser = add_parser(
        bench_subparsers, "train", help="memory and tokens/s of training steps at SP = 1, 2, 4",
        description=(
            "Fresh `usp train` runs at one total sequence length for each RINGxULYSSES of --grid: "
            "per-rank peak memory, baseline, activation part, saved activations and tokens/s. "
            "--find-max-seq also searches the longest sequence for 1 and 4 ranks."
        ),
    )
    parser.add_argument("--model", default="tiny", help="a preset of usp.models")
    parser.add_argument("--seq-len", type=int, default=16384, help="total sequence length")
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the first is warm-up)")
    parser.add_argument("--grid", nargs="+", default=list(training.DEFAULT_GRID),
                        metavar="RINGxULYSSES", help="the ring x ulysses degrees to run")
    parser.add_argument("--layout", default="zigzag", choices=LAYOUTS,
                        help="token layout over the sequence ranks")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: forward under autocast")
    parser.add_argument("--find-max-seq", action="store_true", help="also search the longest S")
    parser.add_argument("--search-start", type=int, default=8192, help="first S of the search")
    parser.add_argument("--max-step-s", type=float, default=90.0, help="stop the search past this")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--features", action="store_true",
                        help="each memory feature off, alone and all on, at every SP of --grid")
    parser.add_argument("--tile-tokens", type=int, default=512, help="--features: tiled MLP tile")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="--features: loss chunk")
    parser.add_argument("--memory-cap-mib", type=int, default=None,
                        help="--features: also the longest S under this peak per rank, all "
                        "features off and on")
    parser.add_argument("--fit-seq-lens", type=int, nargs="+", default=[2048, 4096, 8192],
                        help="--memory-cap-mib: the lengths the peak is fitted through")
    parser.set_defaults(func=_run_train)


def _run_features(args) -> int:
    from usp.bench import memory

    grid = training.parse_grid(args.grid)
    results = memory.measure_features(args, grid)
    print(f"usp bench train --features: model {args.model}, S={args.seq_len}, {args.dtype}, "
          f"{args.steps} steps (first is warm-up), synthetic tokens; activation offload needs "
          "CUDA and is not measured here")
    print(memory.format_features(results))
    report = {"features": results}
    if args.memory_cap_mib:
        configurations = memory.features(args.tile_tokens, args.chunk_tokens)
        found = [memory.longest_under_cap(args, 1, 1, name, configurations[name])
                 for name in ("all off", "all on")]
        print(memory.format_cap(found, args.memory_cap_mib))
        report["memory_cap"] = found
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _run_train(args) -> int:
    if args.features:
        return _run_features(args)
    results = [training.measure(args, ring, ulysses, args.seq_len, args.steps)
               for ring, ulysses in training.parse_grid(args.grid)]
    print(f"usp bench train: model {args.model}, total S={args.seq_len}, {args.dtype}, "
          f"{args.steps} steps (first is warm-up), synthetic tokens")
    print(training.format_grid(results))
    report = {"grid": results}
    if args.find_max_seq:
        report["max_seq"] = []
        for ring, ulysses in ((1, 1), (2, 2)):
            found = training.find_max_seq(args, ring, ulysses)
            report["max_seq"].append(found)
            print(
                f"SP={found['sp']}: trained up to S={found['longest_measured']} (measured); "
                f"{found['bytes_per_token_all_ranks'] / 1024:.1f} KiB/token over all ranks -> "
                f"the {found['machine_memory_gib']:.0f} GiB machine fits S ~ "
                f"{found['memory_limit_seq_len']:,} (extrapolated)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def register_decode(bench_subparsers) -> None:
    parser = add_parser(
        bench_subparsers, "decode",
        help="decode latency and KV-cache bytes vs the cache length; pass-KV vs pass-Q",
        description=(
            "On --nproc spawned CPU ranks: per-token decode latency against a sharded KV cache "
            "of each --cache-lengths, beside the same model alone in one process, the K/V bytes "
            "each rank holds, and a continuation of T new tokens against P cached (T + P = "
            "--crossover-total) through pass-KV and pass-Q. See docs/inference.md."
        ),
    )
    d = DecodeBench()
    a = parser.add_argument
    a("--nproc", type=int, default=d.nproc, help="ranks to spawn (ring x ulysses)")
    a("--ring", type=int, default=d.ring, help="ring degree")
    a("--ulysses", type=int, default=d.ulysses, help="Ulysses degree")
    a("--layout", choices=LAYOUTS, default=d.layout, help="token layout over the ranks")
    a("--model", default=d.model, help="a preset of usp.models (random init)")
    a("--cache-lengths", type=int, nargs="+", default=list(d.cache_lengths),
      help="cached tokens before the timed decode steps, one measurement each")
    a("--steps", type=int, default=d.steps, help="timed decode steps per cache length")
    a("--crossover-total", type=int, default=d.crossover_total, help="T + P")
    a("--crossover-new", type=int, nargs="+", default=list(d.crossover_new), help="each T")
    parser.set_defaults(func=_run_decode)


def _run_decode(args) -> int:
    from usp.bench.decode import run_decode_benchmark
    from usp.cli.bench_tables import format_decode

    bench = DecodeBench(nproc=args.nproc, ring=args.ring, ulysses=args.ulysses,
                        layout=args.layout, model=args.model,
                        cache_lengths=tuple(args.cache_lengths), steps=args.steps,
                        crossover_total=args.crossover_total,
                        crossover_new=tuple(args.crossover_new))
    print(format_decode(run_decode_benchmark(bench)))
    return 0

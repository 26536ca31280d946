"""``usp bench``: the attention benchmark and the training benchmark."""

from __future__ import annotations

import argparse

from usp.bench import training
from usp.bench.attention import BenchShape, configurations, format_rows, run_benchmark
from usp.layout import LAYOUTS


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks measured in one run")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    attention = kinds.add_parser(
        "attention", help="ring, ulysses and usp attention on N spawned CPU ranks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    attention.add_argument("--nproc", type=int, default=4, help="ranks to spawn (gloo)")
    attention.add_argument("--seq-len", type=int, default=8192)
    attention.add_argument("--heads", type=int, default=8)
    attention.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    attention.add_argument("--head-dim", type=int, default=64)
    attention.add_argument("--batch", type=int, default=1)
    attention.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp64"], default="fp32")
    attention.add_argument("--no-causal", dest="causal", action="store_false")
    attention.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    attention.add_argument("--iters", type=int, default=3)
    attention.add_argument("--warmup", type=int, default=1)
    attention.add_argument("--modes", nargs="+", default=["ring", "ulysses", "usp"],
                           choices=["ring", "ulysses", "usp"])
    attention.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    attention.add_argument("--profile", action="store_true",
                           help="print rank 0's top operators for each configuration")
    attention.set_defaults(func=_run_attention)
    training.register(kinds)


def _run_attention(args) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc} must be at least 1")
    shape = BenchShape(
        seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim, batch=args.batch, dtype=args.dtype, causal=args.causal,
        threads=args.threads, iters=args.iters, warmup=args.warmup,
    )
    configs = configurations(args.nproc, args.modes, args.layouts)
    if not configs:
        raise ValueError(f"no configuration of {args.modes} fits {args.nproc} ranks")
    reference, rows = run_benchmark(shape, args.nproc, configs, args.profile)
    print(format_rows(shape, args.nproc, reference, rows))
    return 0

"""``usp bench trainer``: the per-step overhead of with_usp(Trainer) against usp's own loop."""

from __future__ import annotations

import os

from usp.choices import LAYOUTS
from usp.cli.help import add_parser

DESCRIPTION = """\
The same tiny Llama trained on the same batches by usp's own loop (docs/transformers.md:
USPContext.shard, DDP, USPContext.loss, SGD) and by with_usp(Trainer), in alternating rounds
on --nproc spawned CPU ranks, in one run; prints the median step time of each and their ratio
(the integration's overhead: Trainer bookkeeping, sharding the collator's batch, agreements,
the loss's reductions). Timings need an idle machine; the load average is printed with them.

    usp bench trainer                                  # 4 ranks, ring 2 x ulysses 2, S=2048
    usp bench trainer --ring 1 --ulysses 4 --seq-len 4096
"""


def register_trainer(bench_subparsers) -> None:
    parser = add_parser(
        bench_subparsers, "trainer", help="with_usp(Trainer) against usp's own loop, per step",
        description=DESCRIPTION,
    )
    parser.add_argument("--nproc", type=int, default=4, help="ranks to spawn (gloo)")
    parser.add_argument("--ring", type=int, default=2, help="ring degree")
    parser.add_argument("--ulysses", type=int, default=2, help="Ulysses degree")
    parser.add_argument("--layout", choices=LAYOUTS, default="zigzag",
                        help="token layout over the sequence ranks")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per dp rank and step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of loop then Trainer")
    parser.add_argument("--hidden", type=int, default=256, help="the model's hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import json

    from usp.bench.trainer import TrainerBench, format_result, run_benchmark

    bench = TrainerBench(nproc=args.nproc, ring=args.ring, ulysses=args.ulysses,
                         layout=args.layout, seq_len=args.seq_len, batch=args.batch,
                         steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                         hidden=args.hidden, layers=args.layers, threads=args.threads)
    result = run_benchmark(bench)
    print(format_result(result, os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0

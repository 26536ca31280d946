"""``usp train``: the command line of the training job (usp.train does the work)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from usp.train import launch
from usp.train_setup import TrainConfig, add_arguments, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a Llama with sequence parallelism",
        description=(
            "Train a Llama-style model with sequence parallelism (ring x ulysses), FSDP2 and "
            "tensor parallelism. --nproc N launches N ranks through torchrun's elastic launcher; "
            "under an external torchrun the same command runs one rank. See docs/training.md."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config = config_from_args(args)
    try:
        records = launch(config)
    except ChildFailedError as exc:  # the launcher's report names the rank and its traceback
        print(f"usp train: a rank failed\n{exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(summarize(records, config) if records else "nothing to train: already at --steps")
    return 0


def summarize(records: list[dict], config: TrainConfig) -> str:
    steady = records[1:] or records  # the first step pays for warm-up and allocation
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    step_time = sum(r["step_time_s"] for r in steady) / len(steady)
    mfu = sum(r["mfu"] for r in steady) / len(steady)
    peak = max(max(r["peak_memory_bytes"]) for r in records)
    return (
        f"trained steps {records[0]['step']}-{records[-1]['step']}: loss "
        f"{records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, {tokens_per_s:.0f} tok/s, "
        f"{step_time:.2f} s/step, MFU {mfu:.2%}, peak memory per rank {peak / 2**30:.2f} GiB\n"
        f"metrics: {Path(config.out) / 'metrics.jsonl'}\nplot:    {Path(config.out) / 'loss.png'}"
    )

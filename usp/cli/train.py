"""``usp train``: the command line of the training job (usp.launcher and usp.train do the work)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from usp.launcher import describe_failure, launch, resume_hint
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
        # only the flags typed reach the namespace: a resume reads the rest from config.json
        argument_default=argparse.SUPPRESS,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config = config_from_args(args)
    try:
        records = launch(config)
    except ChildFailedError as exc:
        print(f"usp train: a rank failed\n{describe_failure(exc, Path(config.out))}",
              file=sys.stderr)
        return 1
    except SignalException as exc:  # the launcher was told to stop; it stopped its ranks
        print(f"usp train: stopped by {signal.Signals(exc.sigval).name} (and so were its ranks)\n"
              f"{resume_hint(Path(config.out))}", file=sys.stderr)
        return 128 + int(exc.sigval)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summarize(records, config) if records else "nothing to train: already at --steps")
    return 0


def summarize(records: list[dict], config: TrainConfig) -> str:
    steady = records[1:] or records  # the first step pays for warm-up and allocation
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    step_time = sum(r["step_time_s"] for r in steady) / len(steady)
    if all("mfu" in r for r in steady):
        mfu = f", MFU {sum(r['mfu'] for r in steady) / len(steady):.2%}"
    elif any("mfu_above_peak" in r for r in steady):
        mfu = ", MFU not reported (above 100% of the stated --peak-tflops: the peak is wrong)"
    else:
        mfu = ""  # no stated peak (CPU, or a GPU without a datasheet entry): no MFU
    peak = max(max(r["peak_memory_bytes"]) for r in records)
    out = Path(config.out)
    lines = [
        f"trained steps {records[0]['step']}-{records[-1]['step']}: loss "
        f"{records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, {tokens_per_s:.0f} tok/s, "
        f"{step_time:.2f} s/step{mfu}, peak memory per rank {peak / 2**30:.2f} GiB",
        f"metrics:     {out / 'metrics.jsonl'}",
        f"plot:        {out / 'loss.png'}",
    ]
    if (out / "checkpoints").is_dir():
        lines.append(f"checkpoints: {out / 'checkpoints'} (resume: usp train --resume {out})")
    return "\n".join(lines)

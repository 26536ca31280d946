"""``usp train``: the command line of the training job (``usp.training.launcher`` and
``usp.training.loop`` do the work)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from usp.cli.help import add_parser
from usp.cli.spec_flags import add_spec_arguments, given_settings
from usp.spec import RunSpec, read_toml
from usp.training import run_dir

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "train",
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


def add_arguments(parser) -> None:
    """The flags of ``usp train``: one per setting of the run spec (``usp.cli.spec_flags``), and
    ``--config``. They carry no argparse defaults (the parser is built with
    ``argument_default=SUPPRESS``): the namespace holds only what the user typed, so a ``--config``
    file and a resumed run's config.json can give the rest; :class:`RunSpec` holds the defaults."""
    parser.add_argument(
        "--config", metavar="RUN.toml",
        help="read the settings from a run spec in TOML (a table per section, as usp plan --emit "
        "writes it); flags given beside it override it, and it overrides a resumed run's "
        "config.json (default: none)")
    add_spec_arguments(parser)


def spec_from_args(args) -> RunSpec:
    """The run's spec: the flags given, over the ``--config`` file, over the resumed run's
    config.json, over the defaults."""
    given = given_settings(args)
    if getattr(args, "config", None) is not None:
        given = {**read_toml(args.config), **given}
    return RunSpec.from_flat(run_dir.resolve_settings(given, RunSpec().flat()))


def run_cli(args) -> int:
    spec = spec_from_args(args)
    out = Path(spec.checkpoint.out)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("importing torch and checking the settings")
    # torch and the trainer load here, not at import: `usp train --help` stays instant
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from usp.training.launcher import describe_failure, launch, resume_hint

    try:
        records = launch(spec)
    except ChildFailedError as exc:
        print(f"usp train: a rank failed\n{describe_failure(exc, out)}",
              file=sys.stderr)
        return 1
    except SignalException as exc:  # the launcher was told to stop; it stopped its ranks
        print(f"usp train: stopped by {signal.Signals(exc.sigval).name} (and so were its ranks)\n"
              f"{resume_hint(out)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summarize(records, out) if records else (
            f"nothing to train: {out} has finished its {spec.optim.steps} steps; to train "
            f"longer, start a new run from its weights: usp train --init-from {out} "
            "--steps N"))
    return 0


LOSS_MEAN_STEPS = 10  # the summary's mean loss is over this many last steps


def summarize(records: list[dict], out: Path) -> str:
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
    out = Path(out)
    # one step's loss is one batch's: the mean of the last steps says where the run stands
    last = records[-LOSS_MEAN_STEPS:]
    mean = sum(r["loss"] for r in last) / len(last)
    lines = [
        f"trained steps {records[0]['step']}-{records[-1]['step']}: loss "
        f"{records[0]['loss']:.4f} -> {records[-1]['loss']:.4f} (last step; mean of the last "
        f"{len(last)} steps {mean:.4f}), {tokens_per_s:.0f} tok/s, "
        f"{step_time:.2f} s/step{mfu}, peak memory per rank {peak / 2**30:.2f} GiB",
        f"metrics:     {out / 'metrics.jsonl'}",
        f"plot:        {out / 'loss.png'}",
    ]
    if (out / "checkpoints").is_dir():
        lines.append(f"checkpoints: {out / 'checkpoints'} (resume: usp train --resume {out})")
    return "\n".join(lines)

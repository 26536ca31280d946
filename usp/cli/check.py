"""``usp check``: the command line of the correctness self-test (usp.check does the work)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from usp.cli.help import add_parser
from usp.precision import DTYPES

DTYPE_CHOICES = tuple(DTYPES)


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "check",
        help="a correctness self-test of sequence-parallel attention on this machine or cluster",
        description=(
            "Run seeded random attention cases (every ring x ulysses factorisation of the world, "
            "every layout, GQA/MQA, odd lengths and head counts, packed documents, sliding "
            "windows, padding, causal or not) forward and backward on the ranks, against a "
            "single-device reference. --nproc N launches N ranks here (gloo on CPU, NCCL on "
            "CUDA, one GPU per rank); under torchrun (torchrun --nproc-per-node 8 -m usp check) "
            "each process is one rank. Exit status 1 when any case fails. See docs/check.md."
        ),
    )
    a = parser.add_argument
    a("--nproc", type=int, default=None,
      help="ranks to launch on this machine (default: every GPU on cuda, 4 on cpu; ignored "
      "under torchrun)")
    a("--time", type=float, default=120.0, metavar="SECONDS",
      help="time budget: new cases start while it lasts (default 120.0)")
    a("--cases", type=int, default=None, metavar="N", help="at most N cases (default: no limit)")
    a("--seed", type=int, default=0, help="seed of the cases and their tensors (default 0)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"),
      help="gloo on cpu, NCCL on cuda (default auto: cuda when a GPU is visible)")
    a("--dtypes", nargs="+", choices=DTYPE_CHOICES, default=None,
      help="precisions of the cases (default: fp32 bf16 on cpu; fp32 bf16 fp16 on cuda)")
    a("--kernel", default="auto",
      help="attention kernel (default auto: the choice a real run makes)")
    a("--masks", nargs="+", default=None, metavar="KIND",
      help="mask kinds to draw from (default all: none documents window documents+window "
      "padding padding+window documents+padding)")
    a("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from usp.check import MASKS, CheckSettings, launch_check
    from usp.check.launch import resolve_device

    settings = CheckSettings(
        seconds=args.time, seed=args.seed, device=resolve_device(args.device),
        dtypes=tuple(args.dtypes) if args.dtypes else None, kernel=args.kernel,
        masks=tuple(args.masks) if args.masks else MASKS,
        **({"max_cases": args.cases} if args.cases is not None else {}),
    )
    try:
        report = launch_check(settings, args.nproc)
    except ChildFailedError as exc:
        lines = [f"rank {rank}: {_failure_line(failure)}"
                 for rank, failure in sorted(exc.failures.items())]
        print("usp check: FAILED: a rank stopped before the check finished\n" + "\n".join(lines)
              + "\n(usp -v check ... shows each rank's traceback)", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(report.rows))
        print(verdict(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 1 if report.failures else 0


def _failure_line(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    message = failure.message
    message = message.get("message", "") if isinstance(message, dict) else message
    return (str(message).strip().splitlines() or [f"exit code {failure.exitcode}"])[-1]


COLUMNS = ("#", "ring", "uly", "dp", "layout", "dtype", "heads", "S", "D", "mask", "causal",
           "kernel", "fwd err/bound", "bwd err/bound", "result")


def _error(entry) -> str:
    if entry is None:
        return "-"
    name = f" {entry['worst']}" if "worst" in entry else ""
    return f"{entry['error']:.1e}/{entry['bound']:.1e}{name}"


def format_table(rows: list[dict]) -> str:
    """One line per case and dtype (the columns of :data:`COLUMNS`)."""
    cells = [COLUMNS]
    for row in rows:
        padded = f"+{row['slots'] - row['seq_len']}" if row["slots"] != row["seq_len"] else ""
        cells.append((
            str(row["index"]), str(row["ring"]), str(row["ulysses"]), str(row["dp"]),
            row["layout"] + ("*" if row["placement"] == "context-first" else ""), row["dtype"],
            f"{row['heads']}/{row['kv_heads']}", f"{row['seq_len']}{padded}",
            str(row["head_dim"]), row["mask"], "yes" if row["causal"] else "no", row["kernel"],
            _error(row["forward"]), _error(row["backward"]), "ok" if row["ok"] else "FAIL",
        ))
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines + ["(* context-first placement; S+n: padded by n slots; heads "
                              "query/kv; B up to 2 per case)"])


def verdict(report) -> str:
    """The one-line verdict, and a line per failing case naming it and why."""
    total, failures = len(report.rows), report.failures
    dtypes = ", ".join(dict.fromkeys(row["dtype"] for row in report.rows))
    where = (f"({report.cases} cases x {dtypes}) on {report.world_size} "
             f"rank{'s' if report.world_size > 1 else ''} ({report.device}, {report.backend}) "
             f"in {report.seconds:.0f} s")
    if not failures:
        return f"usp check: {total}/{total} checks passed {where}"
    lines = [f"usp check: FAILED: {len(failures)} of {total} checks {where}:"]
    lines += [f"  {row['description']} {row['dtype']}: {row['problem']}" for row in failures]
    return "\n".join(lines)

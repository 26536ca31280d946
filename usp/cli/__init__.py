"""The ``usp`` command: ``usp bench``, ``usp check``, ``usp data``, ``usp export``, ``usp generate``, ``usp plan``,
``usp train``.

Each subcommand is a module of this package exposing ``register(subparsers)``: argument parsing
and printing live here and only here; the library modules they drive log, never print.

Building the parser imports no torch: a subcommand's module reads its choices and defaults from
torch-free modules (``usp.choices``, ``usp.models.llama.presets``, ``usp.spec``, ...) and
imports what runs the command inside the function that runs it, so ``--help`` and argument
errors answer at once (tests/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from usp.cli.help import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    from usp.cli import bench as bench_cli
    from usp.cli import check as check_cli
    from usp.cli import data as data_cli
    from usp.cli import export as export_cli
    from usp.cli import generate as generate_cli
    from usp.cli import plan as plan_cli
    from usp.cli import train as train_cli

    parser = argparse.ArgumentParser(
        prog="usp", description="Unified Sequence Parallelism: Ulysses x Ring attention",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at debug level and print a failed rank's whole traceback")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench_cli.register(subparsers)
    check_cli.register(subparsers)
    data_cli.register(subparsers)
    export_cli.register(subparsers)
    generate_cli.register(subparsers)
    plan_cli.register(subparsers)
    train_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"usp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

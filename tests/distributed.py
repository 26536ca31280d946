"""run_on_ranks: start N gloo ranks on 127.0.0.1, run a function on each, re-raise failures.

Starting a world costs seconds; a case inside it costs milliseconds. Tests therefore run a whole
grid of cases inside one world and collect every failing case (see ``collect_failures``).

The ranks are forked from a fork server that has imported torch and usp once (``forkserver``):
each rank starts as a fresh process, as with ``spawn``, without importing torch again.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp



# imported once by the fork server; a module that is not installed is skipped
PRELOAD = ["torch", "torch.distributed", "usp", "usp.attention", "tests.distributed",
           "transformers"]
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a world's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailure(AssertionError):
    """One or more ranks raised; the message holds every failing rank's traceback."""


def _worker(rank, world_size, port, fn, args, timeout_s, errors, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        results[rank] = fn(rank, world_size, *args)
    except BaseException:  # report every kind of failure back to the parent
        errors[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable, world_size: int, *args, timeout_s: float = 120.0
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new gloo rank processes.

    Returns the per-rank return values (they must pickle). If any rank raises, raises
    :class:`RankFailure` with each failing rank's traceback. A collective that waits longer than
    ``timeout_s`` fails on its rank instead of hanging, and the whole spawn is bounded by it too.
    """
    port = free_port()
    ctx = _CONTEXT
    manager = ctx.Manager()
    errors, results = manager.dict(), manager.dict()
    processes = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, timeout_s, errors, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout_s + 30)
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for p in processes:
        if p.is_alive():
            p.kill()
    errors = dict(errors)
    results = dict(results)
    manager.shutdown()
    if hung:
        errors.update({r: f"rank {r} did not finish within {timeout_s + 30:.0f}s" for r in hung})
    for rank, p in enumerate(processes):
        if rank not in errors and p.exitcode not in (0, None):
            errors[rank] = f"rank {rank} exited with code {p.exitcode}"
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return [results[r] for r in range(world_size)]


def collect_failures(cases, check: Callable) -> list[str]:
    """Run ``check(case)`` for every case; return a line per failing case instead of stopping."""
    failures = []
    for case in cases:
        try:
            check(case)
        except Exception as exc:  # a failing case is data here, reported together at the end
            failures.append(f"{case}: {type(exc).__name__}: {exc}")
    return failures

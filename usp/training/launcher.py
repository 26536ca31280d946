"""Starting ``usp train``: validation, the run directory's lock, the ranks, and their failures.

``usp train --nproc 4 ...`` validates everything, locks the run directory (``usp.training.run_dir``) and
starts four ranks with torchrun's ``elastic_launch``, each running :func:`usp.training.loop.train`. Under an
external ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the same entry runs the rank directly and rank 0
takes the lock. With one process and no torchrun it trains in-process.

**Loopback only.** A ``--nproc`` run is one machine, so nothing of it listens beyond it: the
ranks meet on ``usp.rendezvous``'s loopback-only backend, and their gloo sockets are pinned to
``lo`` (``GLOO_SOCKET_IFNAME``).

**Failures.** A ``ValueError`` on the ranks (bad input that only a rank can see, a corrupt
checkpoint) comes back to the launching process as the same ``ValueError``, without tracebacks;
anything else is torch's ``ChildFailedError``, which :func:`describe_failure` turns into a line
per rank and the checkpoint to resume from.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch

from usp.rendezvous import LOOPBACK, RENDEZVOUS_BACKEND, register_loopback_rendezvous
from usp.spec import RunSpec
from usp.training import checkpoint
from usp.training.checkpoint_record import run_metadata
from usp.training.resume import finished_checkpoint
from usp.training.run_dir import RunLock, check_not_in_use
from usp.training.setup import validate, with_default_batch

logger = logging.getLogger(__name__)

_ERROR = "usp_value_error"  # a rank's result that carries a ValueError's message


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(spec: RunSpec) -> list[dict]:
    """Validate, lock, train on ``spec.nproc`` ranks (or torchrun's); rank 0's records."""
    from usp.training.loop import train

    world_size = int(os.environ["WORLD_SIZE"]) if _under_torchrun() else spec.nproc
    spec = with_default_batch(spec, world_size)
    out, resume = Path(spec.checkpoint.out), spec.checkpoint.resume
    if not _under_torchrun():  # a directory another run holds is said so before anything else
        check_not_in_use(out)
    validate(spec, world_size)
    if resume is not None and finished_checkpoint(
            out, resume, run_metadata(spec, world_size), spec.optim.steps):
        return []  # the run is at its last step: nothing to start
    if _under_torchrun():
        return _result(_worker(spec, run_dir_locked=False, log_level=_log_level()))
    if spec.nproc == 1:
        return train(spec)
    with RunLock(out):
        validate(spec, world_size)  # again under the lock: nothing changed since the first look
        parallel = spec.parallel
        logger.info(
            "launching %d ranks on %s (ring %d x ulysses %d x tp %d), run directory %s; each "
            "rank imports torch and joins the process group before rank 0 reports again",
            spec.nproc, LOOPBACK, parallel.ring, parallel.ulysses, parallel.tp, out,
        )
        return launch_elastic(spec, run_dir_locked=True)


def launch_elastic(spec: RunSpec, run_dir_locked: bool = False) -> list[dict]:
    """Run ``spec.nproc`` fresh rank processes (even one) through torchrun's elastic launcher,
    rendezvous on the loopback interface only."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    register_loopback_rendezvous()
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=spec.nproc,
        run_id=f"usp-train-{uuid.uuid4().hex[:8]}",
        rdzv_backend=RENDEZVOUS_BACKEND,
        rdzv_endpoint=f"{LOOPBACK}:0",
        local_addr=LOOPBACK,  # the address the workers are told to reach the store at
        max_restarts=0,
        start_method="spawn",
    )
    # torch's launcher logs a failed rank's whole traceback; describe_failure says it in a line
    # per rank (with -v, the root logger at DEBUG, torch's report stays)
    quiet = {"torch.distributed.elastic": logging.CRITICAL, "torch.multiprocessing": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quiet}
    if _log_level() > logging.DEBUG:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    try:
        results = elastic_launch(launch_config, _worker)(spec, run_dir_locked, _log_level(), True)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return _result(*[results[rank] for rank in sorted(results)])


def _result(*per_rank):
    """Rank 0's records, or the ValueError the ranks returned (they agree on one message)."""
    errors = [r[_ERROR] for r in per_rank if isinstance(r, dict) and _ERROR in r]
    if errors:
        raise ValueError(errors[0])
    return per_rank[0]


def _log_level() -> int:
    return logging.getLogger().getEffectiveLevel()


def _worker(spec: RunSpec, run_dir_locked: bool, log_level: int, loopback: bool = False):
    """One rank's entry point: threads, network, logging, then :func:`usp.training.loop.train`."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from usp.training.loop import train

    if loopback:  # gloo listens on the address of the interface it is given
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1:  # ranks sharing a machine share its cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    rank = int(os.environ.get("RANK", "0"))
    if not logging.getLogger().handlers:
        logging.basicConfig(
            format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"
        )
    # one voice: rank 0 reports progress; the other ranks speak only of warnings and errors
    logging.getLogger().setLevel(log_level if rank == 0 else max(log_level, logging.WARNING))
    try:
        return record(train)(spec, run_dir_locked=run_dir_locked)
    except ValueError as exc:
        logger.debug("rank %d rejected the run", rank, exc_info=True)
        return {_ERROR: str(exc)}


# ---------------------------------------------------------------------------- failures
def describe_failure(exc, out: Path) -> str:
    """A ``ChildFailedError`` in words: a line per failed rank, then the checkpoint a resume
    would continue from."""
    lines = []
    for local_rank, failure in sorted(exc.failures.items()):
        if failure.exitcode < 0:
            what = f"killed by {failure.signal_name()}"
        else:
            message = failure.message
            message = message.get("message", "") if isinstance(message, dict) else message
            what = (message.strip().splitlines() or [f"exit code {failure.exitcode}"])[-1]
        lines.append(f"rank {local_rank}: {what}")
    lines.append("(usp -v train ... prints each failed rank's traceback)")
    return "\n".join(lines + [resume_hint(out)])


def resume_hint(out: Path) -> str:
    root = Path(out) / "checkpoints"
    steps = checkpoint.steps_saved(root)
    if not steps:
        return f"no checkpoint was saved; start again with: usp train --resume {out}"
    last = checkpoint.step_dir(root, steps[-1])
    return f"the last complete checkpoint is {last} (step {steps[-1]}); continue with: " \
           f"usp train --resume {out}"

"""Starting ``usp train``: validation, the run directory's lock, the ranks, and their failures.

``usp train --nproc 4 ...`` validates everything, locks the run directory
(``usp.training.run_dir``) and starts four ranks with ``usp.launch`` (torchrun's elastic launcher
on the loopback-only rendezvous, the one launcher of every usp command), each running
:func:`usp.training.loop.train`. Under an external ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the
same entry runs the rank directly and rank 0 takes the lock. With one process and no torchrun it
trains in-process.

**Failures.** A ``ValueError`` on the ranks (bad input that only a rank can see, a corrupt
checkpoint) comes back to the launching process as the same ``ValueError``, without tracebacks;
anything else is torch's ``ChildFailedError``, which :func:`describe_failure` turns into a line
per rank and the checkpoint to resume from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from usp.launch import launch_ranks, log_level, rank_setup
from usp.rendezvous import LOOPBACK
from usp.spec import RunSpec
from usp.training import checkpoint
from usp.training.checkpoint_record import run_metadata
from usp.training.resume import finished_checkpoint
from usp.training.run_dir import RunLock, check_not_in_use
from usp.training.setup import validate, with_default_batch

logger = logging.getLogger(__name__)

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
    if _under_torchrun():  # this process is one rank: a ValueError is raised as it is
        from torch.distributed.elastic.multiprocessing.errors import record

        rank_setup(log_level(), loopback=False)
        return record(train)(spec, run_dir_locked=False)
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
    """Run ``spec.nproc`` fresh rank processes (even one) through ``usp.launch`` (torchrun's
    elastic launcher on the loopback rendezvous); rank 0's records."""
    return launch_ranks(spec.nproc, _train_rank, spec, run_dir_locked, name="usp-train",
                        process_group=False)[0]


def _train_rank(spec: RunSpec, run_dir_locked: bool) -> list[dict]:
    from usp.training.loop import train

    return train(spec, run_dir_locked=run_dir_locked)  # it joins the process group itself


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

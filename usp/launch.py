"""Starting ranks on this machine: the one launcher of ``usp train``, ``usp generate``, ``usp
check`` and the benchmarks.

:func:`launch_ranks` runs a module-level function on ``nproc`` fresh processes through torchrun's
elastic launcher, and :func:`rank_setup` prepares each of them (also a rank an external
``torchrun`` started):

- **Loopback only.** The ranks meet on ``usp.rendezvous``'s loopback-only backend and their gloo
  sockets are pinned to ``lo`` (``GLOO_SOCKET_IFNAME``): nothing of a one-machine run listens
  beyond the machine.
- **Cores shared out.** Ranks sharing a machine share its cores (``torch.set_num_threads``).
- **One voice.** Rank 0 logs at the launching process's level; the others only warnings and
  errors. Torch's launcher would log a failed rank's whole traceback: it is quieted unless the
  root logger is at DEBUG (``usp -v``).
- **Bad input comes back as itself.** A ``ValueError`` raised on the ranks (input only a rank
  can see) returns to the launching process as the same ``ValueError``, without tracebacks;
  anything else is torch's ``ChildFailedError``.
"""

from __future__ import annotations

import logging
import os
import uuid

from usp.rendezvous import LOOPBACK, RENDEZVOUS_BACKEND, register_loopback_rendezvous

logger = logging.getLogger(__name__)

_ERROR = "usp_value_error"  # a rank's result that carries a ValueError's message
_QUIET = {"torch.distributed.elastic": logging.CRITICAL, "torch.multiprocessing": logging.ERROR}


def log_level() -> int:
    """The launching process's effective level, handed to its ranks."""
    return logging.getLogger().getEffectiveLevel()


def rank_setup(level: int, loopback: bool = True) -> int:
    """Network, threads and logging of this rank; returns its global rank."""
    import torch

    if loopback:  # gloo listens on the address of the interface it is given
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1:  # ranks sharing a machine share its cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    rank = int(os.environ.get("RANK", "0"))
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level if rank == 0 else max(level, logging.WARNING))
    return rank


def launch_ranks(nproc: int, function, *args, name: str = "usp", backend: str = "gloo",
                 process_group: bool = True) -> list:
    """``function(*args)`` on ``nproc`` fresh ranks of this machine (a module-level function,
    picklable arguments); every rank's result, by rank. ``process_group``: each rank joins the
    default process group of ``backend`` first and leaves it after (False: ``function`` does).
    ``backend="nccl"``: one GPU per rank, ``cuda:LOCAL_RANK``, made current before the group."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    register_loopback_rendezvous()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=f"{name}-{uuid.uuid4().hex[:8]}", rdzv_backend=RENDEZVOUS_BACKEND,
        rdzv_endpoint=f"{LOOPBACK}:0",
        local_addr=LOOPBACK,  # the address the workers are told to reach the store at
        max_restarts=0, start_method="spawn",
    )
    levels = {logger_name: logging.getLogger(logger_name).level for logger_name in _QUIET}
    if log_level() > logging.DEBUG:
        for logger_name, level in _QUIET.items():
            logging.getLogger(logger_name).setLevel(level)
    try:
        results = elastic_launch(config, _worker)(function, args, log_level(), backend,
                                                  process_group)
    finally:
        for logger_name, level in levels.items():
            logging.getLogger(logger_name).setLevel(level)
    per_rank = [results[rank] for rank in sorted(results)]
    errors = [r[_ERROR] for r in per_rank if isinstance(r, dict) and _ERROR in r]
    if errors:  # the ranks agree on one message
        raise ValueError(errors[0])
    return per_rank


def _worker(function, args: tuple, level: int, backend: str, process_group: bool):
    """One rank: :func:`rank_setup`, the process group, then ``function(*args)``; a ValueError
    is returned as data (:func:`launch_ranks` raises it again)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    rank = rank_setup(level)
    if backend == "nccl":  # NCCL talks from the current device: set it before the group
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if process_group:
        dist.init_process_group(backend)
    try:
        return record(function)(*args)
    except ValueError as exc:
        logger.debug("rank %d rejected the input", rank, exc_info=True)
        return {_ERROR: str(exc)}
    finally:
        if process_group and dist.is_initialized():
            dist.destroy_process_group()

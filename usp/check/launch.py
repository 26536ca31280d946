"""Where ``usp check`` runs: ``--nproc`` ranks on this machine, or the world of a torchrun.

``--nproc N`` starts N ranks with the launcher ``usp generate`` uses (torchrun's elastic
launcher on a loopback-only rendezvous): gloo on CPU, NCCL on CUDA with one GPU per rank. Under
an external launcher (``RANK`` and ``WORLD_SIZE`` set, as torchrun sets them) each process is
one rank: it takes ``cuda:LOCAL_RANK``, joins the world and runs the same code. One process and
no launcher: the check runs in this process (a grid of one rank: the kernels and masks alone).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from usp.check.report import CheckReport
from usp.check.runner import CheckSettings, run_check

# a collective that waits this long means a rank is stuck: fail instead of hanging for good
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def under_launcher() -> bool:
    """True inside a world started by torchrun (or any launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` needs one."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    return device


def default_nproc(device: str) -> int:
    """Every GPU of the machine on CUDA; four gloo ranks on CPU."""
    return torch.cuda.device_count() if device == "cuda" else 4


def launch_check(settings: CheckSettings, nproc: int | None = None) -> CheckReport:
    """Run the check where the caller asked (see the module docstring); the report."""
    settings.validate()  # bad settings fail here, before any rank starts
    if under_launcher():
        return check_in_world(settings)
    nproc = default_nproc(settings.device) if nproc is None else nproc
    if nproc < 1:
        raise ValueError(f"--nproc {nproc} must be at least 1")
    if settings.device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(
            f"--nproc {nproc} on cuda needs one GPU per rank; this machine shows "
            f"{torch.cuda.device_count()} (NCCL cannot run two ranks on one GPU)"
        )
    if nproc == 1:
        if settings.device == "cuda":
            torch.cuda.set_device(0)
        return run_check(settings)
    from usp.launch import launch_ranks

    return launch_ranks(nproc, run_check, settings, name="usp-check",
                        backend="nccl" if settings.device == "cuda" else "gloo")[0]


def check_in_world(settings: CheckSettings) -> CheckReport:
    """One rank of an externally launched world: its GPU, the process group, the check."""
    if settings.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ["RANK"]) != 0:  # one voice: the other ranks speak of warnings only
        root = logging.getLogger()
        root.setLevel(max(root.getEffectiveLevel(), logging.WARNING))
    created = False
    if not dist.is_initialized() and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if settings.device == "cuda" else "gloo",
                                timeout=COLLECTIVE_TIMEOUT)
        created = True
    try:
        return run_check(settings)
    finally:
        if created:
            dist.destroy_process_group()

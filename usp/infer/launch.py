"""``usp generate``'s work: its settings, the ranks it starts, and what each rank runs.

Ranks start like ``usp train``'s: torchrun's elastic launcher on the training launcher's
loopback-only rendezvous (nothing listens beyond 127.0.0.1), ``GLOO_SOCKET_IFNAME=lo``, the
machine's cores shared out. Each rank hands the settings to its model family's inference
adapter (``usp.models.family.InferenceAdapter``: a preset Llama from a seed, a local Hugging
Face model directory, ...), which builds the same model, shards the prompt and generates; rank
0's result comes back.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from usp.infer.config import GenerateConfig
from usp.models.registry import family_of
from usp.rendezvous import LOOPBACK, RENDEZVOUS_BACKEND, register_loopback_rendezvous
from usp.topology import Topology

logger = logging.getLogger(__name__)


def launch_generation(config: GenerateConfig) -> dict:
    """Validate, run ``config.nproc`` ranks (in-process for one), return rank 0's result. A
    ``checkpoint`` is exported first (``usp export``, into a temporary folder removed at the
    end) and generates as that Hugging Face folder."""
    config.validate()
    if config.checkpoint is not None:
        return _from_checkpoint(config)
    if config.nproc == 1:
        return run_generation(config)
    return launch_ranks(config.nproc, _generation_rank, asdict(config))


def _from_checkpoint(config: GenerateConfig) -> dict:
    import shutil
    import tempfile
    from dataclasses import replace

    from usp.training.export import export

    folder = Path(tempfile.mkdtemp(prefix="usp-generate-"))
    try:
        exported = export(config.checkpoint, folder / "model")
        result = launch_generation(replace(config, checkpoint=None,
                                           hf_model=str(exported.out)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["model"] = f"{exported.checkpoint} (step {exported.step})"
    return result


def _generation_rank(settings: dict) -> dict:
    return run_generation(GenerateConfig(**settings))


def launch_ranks(nproc: int, function, *args, backend: str = "gloo"):
    """Run ``function(*args)`` on ``nproc`` fresh ranks of this machine (module-level
    ``function``, picklable ``args``); returns rank 0's result. ``backend="nccl"``: one GPU per
    rank, ``cuda:LOCAL_RANK``, made current before the process group starts."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    register_loopback_rendezvous()
    logger.info("starting %d ranks on %s (gloo): each imports torch, joins the process group "
                "and builds the model", nproc, LOOPBACK)
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=f"usp-infer-{uuid.uuid4().hex[:8]}", rdzv_backend=RENDEZVOUS_BACKEND,
        rdzv_endpoint=f"{LOOPBACK}:0", local_addr=LOOPBACK, max_restarts=0,
        start_method="spawn",
    )
    results = elastic_launch(launch_config, _worker)(function, args, logging.getLogger().level,
                                                     backend)
    return results[0]


def _worker(function, args: tuple, log_level: int, backend: str = "gloo"):
    """One rank: network, threads, logging, the process group, then ``function(*args)``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level if rank == 0 else max(log_level, logging.WARNING))
    if backend == "nccl":  # NCCL talks from the current device: set it before the group
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        return function(*args)
    finally:
        dist.destroy_process_group()


def run_generation(config: GenerateConfig) -> dict:
    """Generate on this rank (every rank of the world calls it); the same result everywhere."""
    topology = Topology.build(ring=config.ring, ulysses=config.ulysses)
    text = config.prompt_text()
    settings = config.model_settings()
    return family_of(settings).inference.generate(
        settings, text, topology, seed=config.seed, layout=config.layout,
        ring_pass=config.ring_pass, kernel=config.kernel, dtype=config.dtype,
        max_new_tokens=config.max_new_tokens)

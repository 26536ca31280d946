"""``usp generate``'s work: its settings, the ranks it starts, and what each rank runs.

Ranks start like ``usp train``'s: torchrun's elastic launcher on the training launcher's
loopback-only rendezvous (nothing listens beyond 127.0.0.1), ``GLOO_SOCKET_IFNAME=lo``, the
machine's cores shared out. Each rank builds the same model (a preset Llama from a seed, or a
local Hugging Face model directory), shards the prompt and generates; rank 0's result comes back.
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
from usp.precision import torch_dtype
from usp.infer.generate import generate
from usp.models.llama import Llama, get_config
from usp.rendezvous import LOOPBACK, RENDEZVOUS_BACKEND, register_loopback_rendezvous
from usp.topology import Topology
from usp.training.data import EOT, decode, encode  # the byte-level tokenizer of usp train

logger = logging.getLogger(__name__)


def launch_generation(config: GenerateConfig) -> dict:
    """Validate, run ``config.nproc`` ranks (in-process for one), return rank 0's result."""
    config.validate()
    if config.nproc == 1:
        return run_generation(config)
    return launch_ranks(config.nproc, _generation_rank, asdict(config))


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
    dtype = torch_dtype(config.dtype)
    text = Path(config.prompt_file).read_text(encoding="utf-8")
    if config.hf_model is not None:
        from usp.infer.hf import hf_generate  # transformers is optional: loaded when asked for

        return hf_generate(config.hf_model, text, topology, layout=config.layout,
                           max_new_tokens=config.max_new_tokens, dtype=dtype,
                           kernel=config.kernel)
    model = Llama(get_config(config.model))
    model.init_weights(seed=config.seed)
    model = model.to(dtype).eval()
    prompt = torch.tensor([encode(text)], dtype=torch.long)
    if prompt.shape[1] == 0:
        raise ValueError(f"the prompt file {config.prompt_file!r} is empty")
    result = generate(model, prompt, topology, max_new_tokens=config.max_new_tokens,
                      layout=config.layout, ring_pass=config.ring_pass, kernel=config.kernel)
    tokens = result.tokens[0].tolist()
    return {"prompt_tokens": prompt.shape[1], "tokens": tokens, "text": byte_text(tokens),
            "prefill_seconds": result.prefill_seconds, "token_seconds": result.token_seconds}


def byte_text(tokens: list[int]) -> str:
    """Text of byte-level ids; ids past the byte vocabulary (a random model's) show as ``<id>``."""
    pieces, run = [], []
    for token in tokens:
        if 0 <= token <= EOT:
            run.append(token)
        else:
            pieces += [decode(run), f"<{token}>"]
            run = []
    return "".join(pieces + [decode(run)])

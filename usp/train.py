"""`usp train`: train a Llama with USP x FSDP2 x TP, launched through torchrun's elastic launcher.

``usp train --nproc 4 --ring 2 --ulysses 2 ...`` starts four ranks with
``torch.distributed.launcher.api.elastic_launch`` (c10d rendezvous on 127.0.0.1) and runs
:func:`train` on each. Under an external ``torchrun`` (``RANK``/``WORLD_SIZE`` set), the same entry
runs :func:`train` directly, so multi-node jobs use torchrun's standard rendezvous flags. With one
process and no torchrun it trains in-process without a process group.

Every check of the user's input (:func:`validate`) runs before any rank starts and again on every
rank, so bad input is one clear ``ValueError`` and nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from usp import checkpoint, metrics
from usp.comm import free_port
from usp.train_setup import (
    TrainConfig,
    build_run,
    validate,
)

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "launch", "launch_elastic", "train", "train_step", "validate"]


# ---------------------------------------------------------------------------- launching
def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(config: TrainConfig) -> list[dict]:
    """Validate, train on ``config.nproc`` ranks (or torchrun's); returns rank 0's records."""
    world_size = int(os.environ["WORLD_SIZE"]) if _under_torchrun() else config.nproc
    validate(config, world_size)
    if _under_torchrun() or config.nproc == 1:
        return _worker(config)
    return launch_elastic(config)


def launch_elastic(config: TrainConfig) -> list[dict]:
    """Run ``config.nproc`` fresh rank processes (even one) through torchrun's elastic launcher."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.nproc,
        run_id=f"usp-train-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        start_method="spawn",
    )
    return elastic_launch(launch_config, _worker)(config)[0]


def _worker(config: TrainConfig) -> list[dict]:
    """One rank's entry point: threads, logging, then :func:`train`."""
    from torch.distributed.elastic.multiprocessing.errors import record

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1:  # ranks sharing a machine share its cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s rank {os.environ.get('RANK', '0')} %(levelname)s %(name)s: "
            "%(message)s",
        )
    return record(train)(config)


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- training
def train(config: TrainConfig) -> list[dict]:
    """Train on this rank; returns every step's metrics record (the same loss on every rank).

    Joins an initialised process group if there is one, else starts one from the torchrun
    environment when ``WORLD_SIZE > 1``, else trains as a single process.
    """
    device = _device(config)
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        return _train(config, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(config: TrainConfig, device: torch.device) -> list[dict]:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    _validate_on_every_rank(config, world_size)
    run = build_run(config, device, world_size)
    out = Path(config.out)
    metrics_path = out / "metrics.jsonl"
    start_step = 0
    if config.resume:
        state = checkpoint.load_checkpoint(
            run.resume_path, run.model, run.optimizer, run.metadata, config.seed
        )
        run.scheduler.load_state_dict(state["scheduler"])
        run.batcher.load_state_dict(state["data"])
        start_step = state["step"]
        if rank == 0:
            _truncate_metrics(metrics_path, start_step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "config.json").exists():  # the first run's settings stay on record
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    peak_tflops = config.peak_tflops or _peak_tflops(device, config.dtype)
    log = metrics.MetricsLog(metrics_path, config.steps, start_step, rank == 0, config.progress)
    records = []
    try:
        for step in range(start_step + 1, config.steps + 1):
            record = train_step(run, config, step)
            record["mfu"] = metrics.model_flops_utilization(
                record["tokens_per_s"], run.flops_per_token, world_size, peak_tflops
            )
            log.log(record)
            records.append(record)
            if config.ckpt_every and (step % config.ckpt_every == 0 or step == config.steps):
                trainer_state = {
                    "step": step,
                    "scheduler": run.scheduler.state_dict(),
                    "data": run.batcher.state_dict(),
                }
                checkpoint.save_checkpoint(
                    out / "checkpoints", step, run.model, run.optimizer, trainer_state, run.metadata
                )
    finally:
        log.close()
    if rank == 0 and metrics_path.exists():
        reference = Path(config.reference_metrics) if config.reference_metrics else None
        metrics.plot_loss(metrics_path, out / "loss.png", reference)
    return records


def _validate_on_every_rank(config: TrainConfig, world_size: int) -> None:
    """Validate on each rank and agree: if any rank rejects the input, every rank raises (a file
    missing on one node must not leave the others waiting in a collective). Also the barrier
    that keeps rank 0 from writing into OUT before every rank has checked it."""
    try:
        validate(config, world_size)
        error = None
    except ValueError as exc:
        error = exc
    if dist.is_initialized():
        failed = torch.tensor([float(error is not None)], device=_collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is None and failed.item() > 0:
            error = ValueError("another rank rejected this configuration; see its error message")
    if error is not None:
        raise error


def train_step(run, config: TrainConfig, step: int) -> dict:
    """One optimizer step on the next global batch; returns its metrics record (without MFU)."""
    from usp.data import shard_batch
    from usp.loss import global_mean_cross_entropy

    metrics.release_freed_memory(run.device)
    memory_before = metrics.current_memory_bytes(run.device)
    metrics.reset_peak_memory(run.device)
    start = time.perf_counter()
    batch = shard_batch(run.batcher.next_batch(), run.topology, config.layout)
    batch = {name: tensor.to(run.device) for name, tensor in batch.items()}
    lr = run.scheduler.get_last_lr()[0]
    autocast = torch.autocast(run.device.type, torch.bfloat16, enabled=config.dtype == "bf16")
    with metrics.SavedActivations() as saved:
        with autocast:
            logits = run.model(batch["input_ids"], batch["position_ids"])
        loss = global_mean_cross_entropy(logits, batch["labels"], run.topology)
    loss.backward()
    grad_norm = run.clip_gradients(config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_value = metrics.finite_or_raise(loss.item(), step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    step_time = time.perf_counter() - start
    memory = [memory_before, metrics.peak_memory_bytes(run.device), saved.bytes]
    per_rank = _gather(torch.tensor(memory, dtype=torch.float64))
    tokens = config.global_batch * config.seq_len
    return {
        "step": step,
        "loss": loss_value,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / step_time,
        "step_time_s": step_time,
        "memory_before_step_bytes": [int(m[0]) for m in per_rank],
        "peak_memory_bytes": [int(m[1]) for m in per_rank],
        "saved_activation_bytes": [int(m[2]) for m in per_rank],
    }


def _gather(values: torch.Tensor) -> list[torch.Tensor]:
    if not dist.is_initialized():
        return [values]
    values = values.to(_collective_device())
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    return [g.cpu() for g in gathered]


def _collective_device() -> torch.device:
    """NCCL communicates CUDA tensors, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _peak_tflops(device: torch.device, dtype_name: str) -> float:
    """The datasheet peak of a known GPU, else the mean over ranks of a measured matmul rate."""
    preset = metrics.preset_peak_tflops(device, dtype_name)
    if preset is not None:
        return preset
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    measured = torch.tensor([metrics.measure_peak_tflops(device, dtype)], dtype=torch.float64)
    return float(torch.stack(_gather(measured)).mean())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a crashed run wrote after its last checkpoint (they are redone)."""
    if not path.exists():
        return
    kept = [r for r in metrics.read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


"""The training loop of `usp train`: one rank's run, from the process group to the last checkpoint.

:func:`train` runs on every rank (``usp.training.launcher`` starts the ranks). It validates the input again
and agrees with the other ranks (bad input on one rank raises on all), holds the run directory's
lock on rank 0 unless its launcher holds it, resumes from the first intact checkpoint, and trains,
logging its progress once (rank 0) from the first second.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from usp.inputs import safe_files
from usp.training import checkpoint, metrics, run_dir
from usp.comm import agree, collective_device
from usp.training.resume import choose_intact, init_source, verify_on_every_rank
from usp.training.run_dir import RunLock
from usp.training.evaluate import evaluate
from usp.spec import RunSpec
from usp.training.setup import build_run, uses_cuda, validate, with_default_batch, with_device_dtype

logger = logging.getLogger(__name__)

__all__ = ["train", "train_step", "validate"]


def _device(device: str) -> torch.device:
    if uses_cuda(device):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        # fp32 matmuls on tensor cores (TF32): what MFU of an fp32 run is stated against
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- training
def train(spec: RunSpec, *, run_dir_locked: bool = False) -> list[dict]:
    """Train on this rank; returns every step's metrics record (the same loss on every rank).

    Joins an initialised process group if there is one, else starts one from the torchrun
    environment when ``WORLD_SIZE > 1``, else trains as a single process. Rank 0 locks the run
    directory for the run unless ``run_dir_locked`` (the launching process holds the lock).
    """
    device = _device(spec.device)
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
        if dist.get_rank() == 0:
            logger.info("process group ready: %d ranks (%s)", dist.get_world_size(),
                        dist.get_backend())
    spec = with_default_batch(spec, dist.get_world_size() if dist.is_initialized() else 1)
    spec = with_device_dtype(spec, device)
    try:
        lock = _validate_on_every_rank(spec, run_dir_locked)
        try:
            return _train(spec, device)
        finally:
            if lock is not None:
                lock.release()
    finally:
        if created:
            dist.destroy_process_group()


def _train(spec: RunSpec, device: torch.device) -> list[dict]:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out, optim, checkpoint_section = Path(spec.checkpoint.out), spec.optim, spec.checkpoint
    if rank == 0:
        logger.info("loading the run's data, then building its model")
    run = build_run(spec, device, world_size)
    if rank == 0:
        logger.info("%s", run.data_summary)
    metrics_path = out / run_dir.METRICS
    start_step = 0
    if run.resume_plan is not None:
        if rank == 0:
            for note in run.resume_plan.notes:
                logger.warning("%s", note)
        if run.resume_plan.candidates:
            path = choose_intact(run.resume_plan.candidates, run.metadata)
            state = checkpoint.load_checkpoint(path, run.model, run.optimizer, spec.seed)
            run.scheduler.load_state_dict(state["scheduler"])
            run.batcher.load_state_dict(state["data"])
            start_step = state["step"]
        if rank == 0:
            _truncate_metrics(metrics_path, start_step)
    if start_step == 0 and checkpoint_section.init_from is not None:  # a new run: the weights
        source = init_source(checkpoint_section.init_from)
        verify_on_every_rank(source)
        source_step = checkpoint.load_model_weights(source, run.model)
        if rank == 0:
            logger.info("model weights from %s (step %d of its run); the optimizer, learning-rate "
                        "schedule and step count start fresh", source, source_step)
    if rank == 0:  # what a later --resume reads back (after the resume itself succeeded)
        run_dir.write_settings(out, spec)
    peak = metrics.peak_tflops(device, spec.model.dtype, spec.logging.peak_tflops)
    log = _metrics_log(metrics_path, start_step, rank == 0, spec)
    if rank == 0 and start_step < optim.steps:
        logger.info("training steps %d-%d (the first one also allocates and warms up)",
                    start_step + 1, optim.steps)
    records, eval_every, ckpt_every = [], spec.data.eval_every, checkpoint_section.ckpt_every
    try:
        for step in range(start_step + 1, optim.steps + 1):
            record = train_step(run, step)
            if eval_every and (step % eval_every == 0 or step == optim.steps):
                record["eval_loss"] = evaluate(run)
            record.update(metrics.mfu_fields(
                record["tokens_per_s"], run.flops_per_token, world_size, peak
            ))
            log.log(record)
            records.append(record)
            if ckpt_every and (step % ckpt_every == 0 or step == optim.steps):
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
    if rank == 0 and os.path.lexists(metrics_path):
        reference = spec.logging.reference_metrics
        reference = Path(reference) if reference else None
        metrics.plot_loss(metrics_path, out / run_dir.PLOT, reference)
    return records


def _validate_on_every_rank(spec: RunSpec, run_dir_locked: bool) -> RunLock | None:
    """Validate on each rank, take the run directory's lock on rank 0 (unless the launcher holds
    it), and agree: if any rank rejects the input, every rank raises (a file missing on one node
    must not leave the others waiting in a collective). Also the barrier that keeps rank 0 from
    writing into OUT before every rank has checked it. Returns the lock this rank holds."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, error = None, None
    try:
        if rank == 0 and not run_dir_locked:  # a busy directory is said so first
            run_dir.check_not_in_use(Path(spec.checkpoint.out))
        validate(spec, world_size)
        if rank == 0 and not run_dir_locked:
            lock = RunLock(Path(spec.checkpoint.out)).acquire()
            validate(spec, world_size)  # again under the lock
    except ValueError as exc:
        error = str(exc)
    try:
        agree(dist.group.WORLD if dist.is_initialized() else None, {}, error)
    except ValueError:
        if lock is not None:
            lock.release()
        raise
    return lock


def train_step(run, step: int) -> dict:
    """One optimizer step on the next global batch; returns its metrics record (without MFU)."""
    from usp.training.accumulate import rank_batch, split_micro_batches, train_micro_batches

    metrics.release_freed_memory(run.device)
    memory_before = metrics.current_memory_bytes(run.device)
    metrics.reset_peak_memory(run.device)
    start = time.perf_counter()
    batch = rank_batch(run, run.batcher.next_batch())
    data_time = time.perf_counter() - start
    lr = run.scheduler.get_last_lr()[0]
    autocast_dtype = run.step.autocast_dtype
    if run.pipeline is not None:  # forward and backward of every micro-batch, stage by stage
        with metrics.SavedActivations() as saved, torch.autocast(
                run.device.type, autocast_dtype, enabled=autocast_dtype is not None):
            loss = run.pipeline.step(
                batch["input_ids"], batch["position_ids"], batch["labels"],
                batch.get("documents"),
            )
        saved_bytes = saved.bytes
    else:  # --grad-accum micro-steps, gradients synced in the last
        loss, saved_bytes = train_micro_batches(
            run.model, split_micro_batches(batch, run.step.grad_accum), run.topology,
            run.loss_head, autocast_dtype=autocast_dtype,
            offload_device=run.device if run.step.offload_activations else None,
        )
    grad_norm = run.clip_gradients(run.step.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_value = metrics.finite_or_raise(loss.item(), step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    step_time = time.perf_counter() - start
    memory = [memory_before, metrics.peak_memory_bytes(run.device), saved_bytes]
    per_rank = _gather(torch.tensor(memory, dtype=torch.float64))
    tokens = run.step.tokens
    return {
        "step": step,
        "loss": loss_value,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / step_time,
        "step_time_s": step_time,
        "data_s": data_time,
        "memory_before_step_bytes": [int(m[0]) for m in per_rank],
        "peak_memory_bytes": [int(m[1]) for m in per_rank],
        "saved_activation_bytes": [int(m[2]) for m in per_rank],
    }


def _gather(values: torch.Tensor) -> list[torch.Tensor]:
    if not dist.is_initialized():
        return [values]
    values = values.to(collective_device())
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    return [g.cpu() for g in gathered]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a crashed run wrote after its last checkpoint (they are redone)."""
    if not os.path.lexists(path):
        return
    kept = [r for r in metrics.read_metrics(path, follow_links=False) if r["step"] <= step]
    safe_files.replace(path, "".join(json.dumps(r) + "\n" for r in kept).encode())



def _metrics_log(path: Path, start_step: int, enabled: bool, spec: RunSpec) -> metrics.MetricsLog:
    """The run's metrics log (rank 0 writes it), agreed on by every rank: a viewer that cannot
    start on rank 0 (W&B without a network or an account) stops every rank, saying why."""
    log, error = None, None
    try:
        log = metrics.MetricsLog(path, spec.optim.steps, start_step, enabled, spec.logging,
                                 config=spec.nested())
    except ValueError as exc:
        error = str(exc)
    agree(dist.group.WORLD if dist.is_initialized() else None, {}, error)
    return log

"""The training run's settings: their validation, and the objects built from them.

:func:`validate` is pure (it reads files, never writes or communicates), so the launcher runs it
before starting any rank and every rank runs it again: bad input fails the same way everywhere.
:func:`build_run` turns a valid config into the model (parallelised), optimizer, schedule and data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from usp.training import run_dir
from usp.attention.kernels import KERNELS
from usp.layout import padded_length
from usp.losses import LossHead, check_loss
from usp.pipeline import Pipeline, check_pipeline
from usp.training.accumulate import check_step_options
from usp.training.build import build_model, training_tokens, validate_model
from usp.training.checkpoint_record import run_metadata
from usp.training.config import DEFAULT_CHECKPOINT_EVERY, TrainConfig  # noqa: F401 (re-exported)
from usp.training.data import EOT, data_files, data_summary
from usp.training.evaluate import HeldOut, held_out_split
from usp.training.metrics import read_metrics
from usp.training.resume import ResumePlan, check_init_source, plan_resume
from usp.topology import AXES, Topology

SYNTHETIC_WINDOWS = 16  # synthetic data: this many windows per global-batch row, then repeat


def microbatches(config: TrainConfig) -> int:
    """Pipeline micro-batches per step: as given, or one per stage."""
    return config.microbatches or config.pp


def data_parallel_degree(config: TrainConfig, world_size: int) -> int:
    """dp as given, or (``--dp -1``) the ranks left over by pp x ring x ulysses x tp."""
    inner = config.pp * config.ring * config.ulysses * config.tp
    return config.dp if config.dp != -1 else max(1, world_size // max(1, inner))


def with_default_batch(config: TrainConfig, world_size: int) -> TrainConfig:
    """``config`` with ``--global-batch`` given a value when it was not (0): the smallest batch
    every layout can split, one row per micro-batch (pipeline micro-batches, or gradient
    accumulation steps) of each dp rank: ``dp x microbatches x grad_accum``. A given value is
    kept (and validated); the value recorded in config.json is the one trained."""
    if config.global_batch != 0:
        return config
    rows = data_parallel_degree(config, world_size) * microbatches(config) * config.grad_accum
    return dataclasses.replace(config, global_batch=rows)


def with_device_dtype(config: TrainConfig, device: torch.device) -> TrainConfig:
    """``config`` with ``--dtype auto`` resolved for ``device``: bf16 on CUDA (what its tensor
    cores are for), fp32 on a CPU. The value recorded in config.json is the one trained."""
    if config.dtype != "auto":
        return config
    return dataclasses.replace(config, dtype="bf16" if device.type == "cuda" else "fp32")


# ---------------------------------------------------------------------------- validation
def validate(config: TrainConfig, world_size: int) -> None:
    """Raise ValueError naming the numbers and the fix for any input that cannot train."""
    config = with_default_batch(config, world_size)
    _check_types(config)
    for name in ("seq_len", "global_batch", "steps", "nproc"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(config, name)} must be >= 1")
    if config.warmup < 0 or config.ckpt_every < 0 or config.grad_clip < 0:
        raise ValueError("--warmup, --ckpt-every and --grad-clip must be >= 0")
    if config.kernel != "auto" and config.kernel not in KERNELS:
        raise ValueError(
            f"--kernel {config.kernel!r} is unknown; choose 'auto' or one of {sorted(KERNELS)}"
        )
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
    if not 0 <= config.min_lr <= config.lr:
        raise ValueError(f"--min-lr={config.min_lr} must lie in [0, --lr={config.lr}]")
    inner = config.pp * config.ring * config.ulysses * config.tp
    # the degrees mirror Topology.build's rules, checked here before any rank starts
    if min(config.pp, config.ring, config.ulysses, config.tp) < 1:
        raise ValueError("--pp, --ring, --ulysses and --tp must be >= 1")
    if world_size % inner != 0:
        raise ValueError(
            f"pp={config.pp} x ring={config.ring} x ulysses={config.ulysses} x tp={config.tp} = "
            f"{inner} does not divide the {world_size} ranks; use --nproc a multiple of {inner}"
        )
    dp = world_size // inner if config.dp == -1 else config.dp
    if dp * inner != world_size:
        raise ValueError(
            f"dp={dp} x pp x ring x ulysses x tp = {dp * inner} != {world_size} ranks; "
            "pass --dp -1"
        )
    if config.global_batch % dp != 0:  # only a given --global-batch: the default divides
        raise ValueError(
            f"--global-batch={config.global_batch} is not divisible by dp={dp}; use a multiple "
            f"of {dp}, or more sequence parallelism (ring, ulysses) and a smaller dp"
        )
    # any length: the layout pads it to its slots (masked); tp splits each rank's slots
    slots = padded_length(config.seq_len, config.ring, config.ulysses, config.layout)
    local_len = slots // (config.ring * config.ulysses)
    if local_len % config.tp != 0:
        raise ValueError(
            f"--seq-len={config.seq_len} leaves {local_len} slots per sequence rank, which "
            f"tp={config.tp} cannot split; use a multiple of "
            f"{config.ring * config.ulysses * config.tp * 2}"
        )
    if config.pp > 1:
        check_pipeline(config.pp, config.global_batch // dp, microbatches(config),
                       config.pp_schedule)
    check_step_options(config, dp)
    # a shape-only topology (no process group) lets parallelize's own check run before launch
    sizes = {"pp": config.pp, "dp": dp, "ring": config.ring, "ulysses": config.ulysses,
             "tp": config.tp}
    shape_only = Topology(sizes, {axis: 0 for axis in AXES})
    check_loss(config.loss, shape_only, config.loss_chunk_tokens)
    validate_model(config, shape_only)
    if config.data:
        data_files(config.data)  # text files or folders of them; structured data is refused
    if config.reference_metrics:
        if not Path(config.reference_metrics).is_file():
            raise ValueError(f"--reference-metrics {config.reference_metrics!r} does not exist")
        read_metrics(config.reference_metrics)  # its records, before a run that ends drawing them
    _validate_output(config, world_size)


def _check_types(config: TrainConfig) -> None:
    """Every setting of the type its field declares: flags are parsed to it, but a resumed run
    takes the others from its config.json, which anyone could have edited."""
    hints = typing.get_type_hints(TrainConfig)
    for name, hint in hints.items():
        value = getattr(config, name)
        if not _has_type(value, hint):
            expected = getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)
            raise ValueError(f"setting {name}={value!r} is not of type {expected} (from the "
                             "command line, or the config.json of the run being resumed)")


def _has_type(value, hint) -> bool:
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_has_type(value, argument) for argument in arguments)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, arguments[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _validate_output(config: TrainConfig, world_size: int) -> None:
    run_dir.check_run_directory(Path(config.out))
    run_dir.check_writable(Path(config.out))
    if config.resume is None:
        run_dir.check_fresh(Path(config.out))
        if config.init_from is not None:
            check_init_source(config.init_from, run_metadata(config, world_size))
        return
    plan_resume(Path(config.out), config.resume, run_metadata(config, world_size))
    metrics_path = Path(config.out) / run_dir.METRICS
    if os.path.lexists(metrics_path):  # a resume rewrites it: its records must be readable
        read_metrics(metrics_path, follow_links=False)


# ---------------------------------------------------------------------------- building the run
def lr_at_step(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of step ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Run:
    device: torch.device
    topology: Topology
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batcher: object
    metadata: dict
    flops_per_token: float
    resume_plan: ResumePlan | None
    pipeline: Pipeline | None = None  # pp > 1: this rank's stage runs through it
    end_of_document: int = EOT  # the token id that closes a packed document
    loss_head: LossHead = LossHead()  # how the loss meets the output projection (usp.losses)
    held_out: HeldOut | None = None  # --eval-every: the held-out batches
    data_summary: str = ""  # documents, tokens and epochs, for the log

    def clip_gradients(self, max_norm: float) -> float:
        """Clip to a global norm over every rank's shards; returns the norm before clipping."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # DTensor grads reduce over their own mesh; FSDP and TP parameters may live on different
        # meshes, so sum squared norms per mesh and combine (plain tensors are whole already).
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for grad in grads:
            by_mesh.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
        squared = torch.zeros((), dtype=torch.float64, device=self.device)
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm(group, 2.0)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            squared += norm.double() ** 2
        if self.topology.size("pp") > 1:  # every stage holds other parameters
            dist.all_reduce(squared, group=self.topology.group("pp"))
        total = squared.sqrt()
        if max_norm > 0:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(torch.float32))
        return float(total)


def _training_data(config: TrainConfig):
    """(documents or tokens, the id that ends a document, the number of documents: None for
    synthetic tokens)."""
    from usp.training.data import stdlib_documents, synthetic_tokens, text_file_documents

    if config.synthetic:
        num_tokens = config.global_batch * SYNTHETIC_WINDOWS * config.seq_len + 1
        return synthetic_tokens(num_tokens, seed=config.seed), EOT, None
    documents = text_file_documents(config.data) if config.data else stdlib_documents()
    return (*training_tokens(config, documents), len(documents))


def build_run(config: TrainConfig, device: torch.device, world_size: int) -> Run:
    from usp.training.data import TokenBatcher

    topology = Topology.build(ring=config.ring, ulysses=config.ulysses, dp=config.dp, tp=config.tp,
                              pp=config.pp)
    resume_plan = (plan_resume(Path(config.out), config.resume, run_metadata(config, world_size))
                   if config.resume else None)
    # built on the meta device and materialised shard by shard; a checkpoint to resume from
    # (or --init-from's) replaces --hf-model's weights, so they are not read
    model, flops_per_token = build_model(
        config, topology, device, load_weights=not (resume_plan and resume_plan.candidates)
        and config.init_from is None,
    )
    loss_head = LossHead(config.loss, config.loss_chunk_tokens)
    pipeline = None
    if topology.size("pp") > 1:
        pipeline = Pipeline(model, topology, device, microbatches(config), config.pp_schedule,
                            loss_head)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms: decay would fight their scale
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    schedule = partial(
        lr_at_step, warmup=config.warmup, total=config.steps, min_ratio=config.min_lr / config.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    tokens, end_of_document, documents = _training_data(config)
    held_out = None
    if config.eval_every:
        tokens, held_out = held_out_split(tokens, config.global_batch, config.seq_len,
                                          config.eval_batches)
    batcher = TokenBatcher(tokens, config.global_batch, config.seq_len, config.seed)
    held_tokens = held_out.tokens.numel() if held_out is not None else 0
    return Run(
        device=device, topology=topology, model=model, optimizer=optimizer, scheduler=scheduler,
        batcher=batcher, metadata=run_metadata(config, world_size), flops_per_token=flops_per_token,
        pipeline=pipeline, resume_plan=resume_plan, end_of_document=end_of_document,
        loss_head=loss_head, held_out=held_out,
        data_summary=data_summary(documents, batcher.tokens.numel(), held_tokens, config.steps,
                                  config.global_batch, config.seq_len),
    )

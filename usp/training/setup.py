"""The training run's settings (a :class:`usp.spec.RunSpec`): their validation, section by
section, and the objects built from them.

:func:`validate` is pure (it reads files, never writes or communicates), so the launcher runs it
before starting any rank and every rank runs it again: bad input fails the same way everywhere.
Each section is checked by the module that owns what it describes: ``parallel`` by
:func:`usp.topology.mesh_sizes` (the rules ``Topology.build`` lays its mesh by), ``model`` by its
family (``usp.inputs.model.validate_model``), ``data`` by ``usp.data.run.check_data``,
``optim`` by ``usp.training.optim``, ``memory`` by ``usp.parallel``, ``usp.memory`` and
``usp.losses``, ``checkpoint`` by the run directory and the resume plan, ``logging`` by
``usp.training.metrics``. :func:`build_run` turns a valid spec into the model (parallelised),
optimizer, schedule and data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from dataclasses import replace as copy_with  # a dataclass copied with fields changed
from pathlib import Path

import torch
import torch.distributed as dist

from usp.attention.kernels import KERNELS
from usp.layout import check_ring_layout, check_tp_split, padded_length
from usp.losses import LossHead, check_loss
from usp.memory import check_offload
from usp.parallel import check_memory_options
from usp.pipeline import Pipeline, check_pipeline
from usp.spec import Checkpoint, Data, Parallel, RunSpec
from usp.topology import AXES, Topology, mesh_sizes
from usp.training import run_dir
from usp.training.accumulate import check_accumulation
from usp.inputs.model import model_name, validate_model
from usp.training.build import build_model
from usp.training.checkpoint_record import run_metadata
from usp.training.data import data_summary
from usp.training.metrics import check_logging, read_metrics
from usp.training.optim import build_optimizer, check_optim
from usp.training.resume import ResumePlan, check_init_source, plan_resume

logger = logging.getLogger(__name__)

SYNTHETIC_WINDOWS = 16  # synthetic data: this many windows per global-batch row, then repeat


def microbatches(parallel: Parallel) -> int:
    """Pipeline micro-batches per step: as given, or one per stage."""
    return parallel.microbatches or parallel.pp


def data_parallel_degree(parallel: Parallel, world_size: int) -> int:
    """dp as given, or (``--dp -1``) the ranks left over by pp x ring x ulysses x tp."""
    inner = parallel.pp * parallel.ring * parallel.ulysses * parallel.tp
    return parallel.dp if parallel.dp != -1 else max(1, world_size // max(1, inner))


def with_default_batch(spec: RunSpec, world_size: int) -> RunSpec:
    """``spec`` with ``--global-batch`` given a value when it was not (0): the smallest batch
    every layout can split, one row per micro-batch (pipeline micro-batches, or gradient
    accumulation steps) of each dp rank: ``dp x microbatches x grad_accum``. A given value is
    kept (and validated); the value recorded in config.json is the one trained."""
    if spec.data.global_batch != 0:
        return spec
    parallel = spec.parallel
    rows = (data_parallel_degree(parallel, world_size) * microbatches(parallel)
            * spec.optim.grad_accum)
    # a copy of the spec's own fields, each already of its type (not RunSpec.replace's flat path)
    return copy_with(spec, data=copy_with(spec.data, global_batch=rows))


def with_device_dtype(spec: RunSpec, device: torch.device) -> RunSpec:
    """``spec`` with ``--dtype auto`` resolved for ``device``: bf16 on CUDA (what its tensor
    cores are for), fp32 on a CPU. The value recorded in config.json is the one trained."""
    if spec.model.dtype != "auto":
        return spec
    dtype = "bf16" if device.type == "cuda" else "fp32"
    return copy_with(spec, model=copy_with(spec.model, dtype=dtype))


def uses_cuda(device: str) -> bool:
    """Whether ``--device`` puts the ranks on CUDA devices."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


# ---------------------------------------------------------------------------- validation
def validate(spec: RunSpec, world_size: int) -> None:
    """Raise ValueError naming the numbers and the fix for any input that cannot train.

    The mesh's sizes come first (every later check reads them), then this wing's own sections
    (optimizer, batch, logging, run directory), then the layers below it from the top down:
    the data, the model, the memory features, the pipeline, the loss and the token layout."""
    spec = with_default_batch(spec, world_size)
    checkpoint = spec.checkpoint
    # what a checkpoint records of this run, to compare with the one a resume or --init-from reads
    metadata = (run_metadata(spec, world_size) if checkpoint.resume is not None
                or checkpoint.init_from is not None else None)
    if spec.nproc < 1:
        raise ValueError(f"--nproc={spec.nproc} must be >= 1")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
    parallel, data, memory = spec.parallel, spec.data, spec.memory
    sizes = mesh_sizes(world_size, ring=parallel.ring, ulysses=parallel.ulysses, dp=parallel.dp,
                       tp=parallel.tp, pp=parallel.pp)
    cuda = uses_cuda(spec.device)
    check_optim(spec.optim)
    _check_batch(data, parallel, sizes["dp"])
    check_accumulation(data.global_batch, sizes["dp"], spec.optim.grad_accum, parallel.pp)
    check_logging(spec.logging)
    _check_checkpoint(checkpoint, metadata)
    if memory.offload_activations and parallel.pp > 1:
        raise ValueError("--offload-activations with pp > 1 is not offered yet: the "
                         "pipeline's schedule runs the forward passes; use pp=1")
    if not data.synthetic:  # the settings, every path, the chat template (usp.data)
        from usp.data.run import check_data

        given = data_spec(data, spec.model.tokenizer)
        check_data(given)
    topology = Topology(sizes, {axis: 0 for axis in AXES})  # shapes only: no process group
    validate_model(spec.model, topology, cuda, memory.loss, spec.parallel.layout)
    check_memory_options(memory.ac, memory.tiled_mlp)
    if parallel.pp > 1:
        check_pipeline(parallel.pp, data.global_batch // sizes["dp"], microbatches(parallel),
                       parallel.pp_schedule)
    check_loss(memory.loss, topology, memory.loss_chunk_tokens)
    check_tp_split(data.seq_len, parallel.ring, parallel.ulysses, parallel.tp, parallel.layout)
    check_ring_layout(parallel.ring_layout, padded_length(
        data.seq_len, parallel.ring, parallel.ulysses, parallel.layout), parallel.ring)
    if memory.offload_activations:
        check_offload(torch.device("cuda" if cuda else "cpu"))


def _check_batch(data: Data, parallel: Parallel, dp: int) -> None:
    """The data section's sizes and held-out split (what the data holds: ``usp.data``), and
    the kernel the parallel section names."""
    for name in ("seq_len", "global_batch"):
        if getattr(data, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(data, name)} must be >= 1")
    if data.eval_every < 0 or data.eval_batches < 1:
        raise ValueError(f"--eval-every={data.eval_every} must be >= 0 and --eval-batches="
                         f"{data.eval_batches} >= 1")
    if data.eval_every and parallel.pp > 1:
        raise ValueError("--eval-every with pp > 1: the held-out loss runs the whole model on "
                         "each rank's stage, which the pipeline does not offer yet; use pp=1")
    if data.global_batch % dp != 0:  # only a given --global-batch: the default divides
        raise ValueError(
            f"--global-batch={data.global_batch} is not divisible by dp={dp}; use a multiple "
            f"of {dp}, or more sequence parallelism (ring, ulysses) and a smaller dp"
        )
    if parallel.kernel != "auto" and parallel.kernel not in KERNELS:
        raise ValueError(
            f"--kernel {parallel.kernel!r} is unknown; choose 'auto' or one of {sorted(KERNELS)}"
        )


def _check_checkpoint(checkpoint: Checkpoint, metadata: dict | None) -> None:
    """The checkpoint section: the run directory, and what a resume or --init-from reads
    (against ``metadata``, this run's record)."""
    out = Path(checkpoint.out)
    if checkpoint.ckpt_every < 0:
        raise ValueError(f"--ckpt-every={checkpoint.ckpt_every} must be >= 0")
    run_dir.check_run_directory(out)
    run_dir.check_writable(out)
    if checkpoint.resume is None:
        run_dir.check_fresh(out)
        if checkpoint.init_from is not None:
            check_init_source(checkpoint.init_from, metadata)
        return
    plan_resume(out, checkpoint.resume, metadata)
    metrics_path = out / run_dir.METRICS
    if os.path.lexists(metrics_path):  # a resume rewrites it: its records must be readable
        read_metrics(metrics_path, follow_links=False)


# ---------------------------------------------------------------------------- building the run
@dataclass(frozen=True)
class StepOptions:
    """What a training step reads of the spec: how the batch is cut and computed."""

    layout: str = "stripe"
    separate_documents: bool = True  # packed documents each their own sequence (not synthetic)
    grad_accum: int = 1
    autocast_dtype: torch.dtype | None = None  # --dtype bf16: the forward under autocast
    offload_activations: bool = False
    grad_clip: float = 1.0
    tokens: int = 0  # global tokens per step

    @classmethod
    def of(cls, spec: RunSpec) -> "StepOptions":
        return cls(layout=spec.parallel.layout,
                   separate_documents=spec.data.pack and not spec.data.synthetic,
                   grad_accum=spec.optim.grad_accum,
                   autocast_dtype=torch.bfloat16 if spec.model.dtype == "bf16" else None,
                   offload_activations=spec.memory.offload_activations,
                   grad_clip=spec.optim.grad_clip,
                   tokens=spec.data.global_batch * spec.data.seq_len)


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
    loss_head: LossHead = LossHead()  # how the loss meets the output projection (usp.losses)
    held_out: object = None  # --eval-every: the held-out batches (usp.data.batcher)
    data_summary: str = ""  # documents, tokens and epochs, for the log
    step: StepOptions = StepOptions()  # how each step runs (the settings it reads)

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


def data_spec(data: Data, tokenizer: str | None):
    """The run's data settings as ``usp.data`` takes them."""
    from usp.data.spec import DataSpec

    return DataSpec(paths=tuple(data.data), text_field=data.text_field,
                    chat_field=data.chat_field, loss_on=data.loss_on,
                    tokenizer=tokenizer, cache=data.data_cache or "")


def _run_data(data: Data, tokenizer: str | None, seed: int):
    """The run's batches (``usp.data.run.RunData``): the data's tokens from the cache (or
    seeded random tokens), the held-out batches of ``--eval-every``."""
    from usp.data.run import prepare_on_every_rank, run_data, synthetic_store

    eval_batches = data.eval_batches if data.eval_every else 0
    given = None if data.synthetic else data_spec(data, tokenizer)
    if data.synthetic:
        num_tokens = data.global_batch * SYNTHETIC_WINDOWS * data.seq_len + 1
        store = synthetic_store(num_tokens, seed)
        return run_data(store, data.global_batch, data.seq_len, seed, eval_batches)
    prepared = prepare_on_every_rank(given)
    return run_data(prepared.store, data.global_batch, data.seq_len, seed, eval_batches,
                    prepared.render, prepared.documents)


def build_run(spec: RunSpec, device: torch.device, world_size: int) -> Run:
    parallel, checkpoint = spec.parallel, spec.checkpoint
    metadata = run_metadata(spec, world_size)
    resume_plan = (plan_resume(Path(checkpoint.out), checkpoint.resume, metadata)
                   if checkpoint.resume else None)
    # then bad data stops every rank before the model is built
    data = _run_data(spec.data, spec.model.tokenizer, spec.seed)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("building %s", model_name(spec.model))
    topology = Topology.build(ring=parallel.ring, ulysses=parallel.ulysses, dp=parallel.dp,
                              tp=parallel.tp, pp=parallel.pp)
    # built on the meta device and materialised shard by shard; a checkpoint to resume from
    # (or --init-from's) replaces --hf-model's weights, so they are not read
    model, flops_per_token = build_model(
        spec.model, parallel, spec.memory, topology, device, seq_len=spec.data.seq_len,
        seed=spec.seed, load_weights=not (resume_plan and resume_plan.candidates)
        and checkpoint.init_from is None,
    )
    loss_head = LossHead(spec.memory.loss, spec.memory.loss_chunk_tokens)
    pipeline = None
    if topology.size("pp") > 1:
        pipeline = Pipeline(model, topology, device, microbatches(parallel),
                            parallel.pp_schedule, loss_head)
    optimizer, scheduler = build_optimizer(model, spec.optim)
    return Run(
        device=device, topology=topology, model=model, optimizer=optimizer, scheduler=scheduler,
        batcher=data.batcher, metadata=metadata,
        flops_per_token=flops_per_token, pipeline=pipeline, resume_plan=resume_plan,
        loss_head=loss_head, held_out=data.held_out,
        data_summary=data_summary(data.documents, data.batcher.num_tokens, data.held_out_tokens,
                                  spec.optim.steps, spec.data.global_batch, spec.data.seq_len),
        step=StepOptions.of(spec),
    )

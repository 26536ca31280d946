"""The planner speaks the run spec: a configuration and its workload as a :class:`RunSpec`, and
back.

:func:`to_run_spec` writes what the planner chose into a spec ``usp train`` runs (``usp plan
--emit``); :func:`from_run_spec` reads the configuration and workload a spec describes, for the
planner to cost (``usp plan --config run.toml``, ``usp bench plan``). A configuration's fields
are the spec's (:data:`SHARED`, copied by name); what each side leaves implicit is made explicit
here: the spec's ``dp = -1`` (the rest of the world), ``microbatches = 0`` (one per stage),
``global_batch = 0`` (one row per micro-batch) and ``dtype = "auto"``, and the planner's
``zero = 0`` when nothing is sharded (the spec keeps its default, which then shards nothing).
Torch-free.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from usp.models.llama.presets import CONFIGS
from usp.plan.config import ParallelConfig, check_config
from usp.plan.presets import get_model
from usp.plan.specs import GIB, ClusterSpec, Workload
from usp.spec import SECTION_OF, RunSpec

# The fields a configuration and a run spec share, under the same names. The one left out,
# tp_sequence_parallel, is always on in usp train (its tensor parallelism is Megatron-SP).
SHARED = tuple(f.name for f in dataclasses.fields(ParallelConfig) if f.name in SECTION_OF)


def default_dtype(cluster: ClusterSpec) -> str:
    """``usp train --dtype auto`` on ``cluster``: fp32 on CPU ranks, bf16 on GPUs."""
    return "fp32" if cluster.name == "cpu" else "bf16"


def model_settings(name_or_path: str) -> dict[str, str | None]:
    """The spec's model section for ``usp plan --model``'s value: a usp train preset by name, a
    Hugging Face config.json (or its folder) as ``hf_config``; ValueError for a shape usp train
    cannot build under that name."""
    if name_or_path in CONFIGS:
        return {"model": name_or_path, "hf_config": None, "hf_model": None}
    path = Path(name_or_path)
    if (path / "config.json").is_file() or path.is_file():
        return {"hf_config": str(path.resolve()), "hf_model": None}
    raise ValueError(
        f"usp train does not build {name_or_path!r} (its presets are {', '.join(CONFIGS)}); "
        f"plan the model from its Hugging Face config.json, --model PATH/config.json (or the "
        f"folder), and the run spec trains it with hf_config = PATH"
    )


def to_run_spec(config: ParallelConfig, workload: Workload, cluster: ClusterSpec,
                model: dict[str, str | None], base: RunSpec | None = None) -> RunSpec:
    """The run spec of ``config`` on ``workload``: ``base`` (default: the spec's defaults) with
    its parallel and memory sections, ``grad_accum``, ``seq_len``, ``global_batch``, ``dtype``,
    the model settings ``model`` (:func:`model_settings`; empty: ``base``'s, the model
    ``workload`` was read from), and the device and ranks per node of ``cluster`` set.
    ValueError, naming the reasons, when usp train cannot run it."""
    problems = check_config(workload, cluster, config)
    if problems:
        raise ValueError(f"usp train cannot run {config.label()}: " + "; ".join(problems))
    if not workload.causal:
        raise ValueError("usp train trains causal language models; plan without --non-causal")
    settings = {name: getattr(config, name) for name in SHARED}
    if config.shard_size == 1:
        settings["zero"] = RunSpec().parallel.zero  # nothing to shard: the spec's default
    settings.update(model, seq_len=workload.seq_len, global_batch=workload.global_batch,
                    dtype=workload.dtype, nproc=cluster.gpus_per_node,
                    device="cpu" if cluster.name == "cpu" else "cuda")
    return (base or RunSpec()).replace(**settings)


def _world_dp(spec: RunSpec, cluster: ClusterSpec) -> int:
    """The spec's dp, or (dp = -1) the ranks of ``cluster`` the other degrees leave."""
    parallel = spec.parallel
    if parallel.dp != -1:
        return parallel.dp
    inner = parallel.pp * parallel.ring * parallel.ulysses * parallel.tp
    if cluster.world_size % inner:
        raise ValueError(f"pp x ring x ulysses x tp = {inner} does not divide the "
                         f"{cluster.world_size} GPUs of {cluster.name}; dp = -1 cannot fill it")
    return cluster.world_size // inner


def planned_model(spec: RunSpec):
    """The shapes of the spec's model: its Hugging Face folder or config.json, or the preset."""
    model = spec.model
    if model.hf_model is not None:
        return get_model(model.hf_model)
    if model.hf_config is not None:
        path = Path(model.hf_config)
        if not (path.is_file() or (path / "config.json").is_file()):
            raise ValueError(f"hf_config = {model.hf_config!r}: the planner reads a model's "
                             "shapes from a config.json (or its folder), which this is not")
        return get_model(model.hf_config)
    return get_model(model.model)


def from_run_spec(spec: RunSpec, cluster: ClusterSpec) -> tuple[ParallelConfig, Workload]:
    """The configuration and workload ``spec`` runs on ``cluster``, as usp train reads it."""
    parallel, flat = spec.parallel, spec.flat()
    dp = _world_dp(spec, cluster)
    # 0 is one per stage; without a pipeline the micro-batches are grad_accum's
    microbatches = (parallel.microbatches or parallel.pp) if parallel.pp > 1 else 1
    settings = {name: flat[name] for name in SHARED}
    settings.update(dp=dp, microbatches=microbatches)
    if dp * parallel.ring * parallel.ulysses == 1:
        settings["zero"] = 0  # nothing is sharded
    config = ParallelConfig(**settings)
    # usp train's default batch: one row per micro-batch of each dp rank
    global_batch = spec.data.global_batch or dp * microbatches * spec.optim.grad_accum
    dtype = spec.model.dtype
    if dtype == "auto":
        dtype = {"cpu": "fp32", "cuda": "bf16"}.get(spec.device, default_dtype(cluster))
    workload = Workload(planned_model(spec), spec.data.seq_len, global_batch, dtype=dtype)
    return config, workload


def header(cost, workload: Workload, cluster: ClusterSpec, when: str) -> str:
    """The comment an emitted spec opens with: what was planned, on what, the prediction."""
    model, params = workload.model, workload.model.total_params
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    devices = "CPU ranks" if cluster.name == "cpu" else "GPUs"
    return "\n".join([
        f"usp plan, {when}: {model.name} ({size} parameters), {workload.seq_len:,} tokens x "
        f"{workload.global_batch} per step, {workload.dtype}",
        f"cluster {cluster.name}: {cluster.nodes} x {cluster.gpus_per_node} {devices}, "
        f"{cluster.memory_gib:g} GiB and {cluster.peak_tflops:g} TFLOPS each",
        f"configuration: {cost.config.label()}",
        f"predicted: {cost.step_time:.3f} s per step, {cost.tokens_per_second:,.0f} tokens/s, "
        f"MFU {100 * cost.mfu:.1f}%, {cost.memory_total / GIB:.2f} GiB per GPU of "
        f"{cost.usable_memory / GIB:.2f} usable",
    ])


def launch_commands(path: str, cluster: ClusterSpec) -> list[str]:
    """How to run the spec at ``path`` on ``cluster``: usp train on one machine, torchrun on
    each node (``HOST``: the first node's address)."""
    gpus, nodes = cluster.gpus_per_node, cluster.nodes
    torchrun = f"torchrun --nnodes {nodes} --nproc-per-node {gpus}"
    if nodes > 1:
        torchrun += " --rdzv-backend c10d --rdzv-endpoint HOST:29500"
    one_machine = ("starts the ranks of one machine" if nodes == 1 else
                   f"starts one node's {gpus} ranks: for {nodes} nodes use torchrun")
    return [f"usp train --config {path}    # {one_machine}",
            f"{torchrun} -m usp train --config {path}"
            + ("    # on each node; HOST: the first node's address" if nodes > 1 else "")]

"""`usp bench plan`: the planner's memory prediction against real `usp train` steps.

Each row is a fresh ``usp train`` run (own gloo ranks, synthetic tokens, a few steps, no
checkpoints) of one model, sequence length, 4-D mesh and memory features: the planner's
configuration of the row (:meth:`Row.config`), written as a run spec by
:func:`usp.plan.spec_io.to_run_spec`, so the run is the configuration the planner costs. The last
step's per-rank counters (``usp.training.metrics``: the resident set at the start of the step and
its high-water mark during it) are compared with ``usp.plan.memory`` for the same configuration
in fp32, plus the runtime itself (Python, torch, gloo), measured once per world size in bare rank
processes that import the same modules and join a process group but build no model.

**Allocator.** The ranks run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: glibc then maps
every tensor of 64 KiB or more on its own and returns it on free, so the resident set follows the
live tensors. With glibc's default, the threshold grows with the first large frees, freed tensors
stay in the heap, and the measured peak is the allocator's history (+30 to +50 % of the step's
part, varying by rank and run), not what the step holds.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass


from usp.bench.options import PLAN_MESHES as MESHES
from usp.plan.config import ParallelConfig
from usp.plan.memory import memory_per_gpu, resting_memory
from usp.plan.presets import cpu_cluster, get_model
from usp.plan.spec_io import model_settings, to_run_spec
from usp.plan.specs import Workload
from usp.spec import RunSpec

MIB = 2**20
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# ``--features``: each memory feature of usp train on a mesh where it matters, as
# (mesh, ac, loss, tiled_mlp, grad_accum); the vocabulary-parallel loss needs tp
FEATURES = (
    ("uly4", "none", "chunked", 0, 1), ("tp2xring2", "none", "vocab_parallel", 0, 1),
    ("pp2xtp2", "none", "vocab_parallel", 0, 1), ("ring2xuly2", "none", "full", 512, 1),
    ("dp2xuly2", "attention", "full", 0, 1), ("uly4", "none", "full", 0, 2),
)
# what every row's run sets beside its configuration: throughput settings, no checkpoints
BENCH_SETTINGS = dict(synthetic=True, progress=False, warmup=1, ckpt_every=0)


@dataclass(frozen=True)
class Row:
    """One run: a model, a sequence length, a mesh (axis degrees) and memory features, named as
    in the run spec."""

    model: str
    seq_len: int
    mesh: str
    ac: str = "none"
    micro_batch: int = 1
    loss: str = "full"
    tiled_mlp: int = 0
    grad_accum: int = 1  # pp 1 only

    def degrees(self) -> dict[str, int]:
        degrees = dict(dp=1, tp=1, pp=1, ring=1, ulysses=1)
        if self.mesh not in MESHES:
            raise ValueError(f"mesh {self.mesh!r}; choose one of {sorted(MESHES)}")
        degrees.update(MESHES[self.mesh])
        return degrees

    @property
    def world_size(self) -> int:
        return math.prod(self.degrees().values())

    @property
    def global_batch(self) -> int:
        d = self.degrees()  # one micro-batch per pipeline stage
        return d["dp"] * d["pp"] * self.micro_batch * self.grad_accum

    def config(self) -> ParallelConfig:
        """The planner's configuration of this row: FSDP (ZeRO-3, usp train's default) over
        dp x ring x ulysses when that shards, one micro-batch per pipeline stage."""
        d = self.degrees()
        return ParallelConfig(**d, zero=3 if d["dp"] * d["ring"] * d["ulysses"] > 1 else 0,
                              microbatches=d["pp"], grad_accum=self.grad_accum, ac=self.ac,
                              loss=self.loss, tiled_mlp=self.tiled_mlp)

    def workload(self) -> Workload:
        return Workload(get_model(self.model), self.seq_len, self.global_batch, dtype="fp32")

    def run_spec(self, steps: int) -> RunSpec:
        """What ``usp train`` runs for this row: its configuration on this machine's ranks."""
        base = RunSpec().replace(steps=steps, **BENCH_SETTINGS)
        return to_run_spec(self.config(), self.workload(), cpu_cluster(self.world_size),
                           model_settings(self.model), base)

    def label(self) -> str:
        features = "".join([f" loss={self.loss}" if self.loss != "full" else "",
                            f" tile={self.tiled_mlp}" if self.tiled_mlp else "",
                            f" accum={self.grad_accum}" if self.grad_accum > 1 else ""])
        return f"{self.model} S={self.seq_len} {self.mesh} ac={self.ac}{features}"


@contextlib.contextmanager
def allocator_environment():
    """Set ``ALLOCATOR_ENV`` for the ranks started inside (they inherit the environment)."""
    saved = {key: os.environ.get(key) for key in ALLOCATOR_ENV}
    os.environ.update(ALLOCATOR_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_records(spec: RunSpec) -> list[dict]:
    """Run ``usp train`` on ``spec`` (spawned gloo ranks, a temporary run directory); every
    step's metrics record."""
    from usp.training.launcher import launch_elastic
    from usp.training.setup import validate

    with tempfile.TemporaryDirectory(prefix="usp-bench-plan-") as out:
        spec = spec.replace(out=out)
        if spec.parallel.placement != "head-first":
            raise ValueError(f"placement={spec.parallel.placement!r}: usp train places the "
                             "ranks head-first")
        validate(spec, spec.nproc)
        return launch_elastic(spec)


def _runtime_worker(degrees: dict[str, int]) -> int:
    """One bare rank of the world ``usp.launch`` started: the modules a training rank holds, the
    mesh of ``degrees``; its resident bytes."""
    import ctypes

    import torch
    import torch.distributed as dist

    import usp.training.loop  # noqa: F401  (the modules a training rank holds)
    from usp.topology import Topology
    from usp.training.metrics import current_memory_bytes

    Topology.build(**degrees)  # the mesh and its groups, as build_run makes them
    dist.barrier()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident = current_memory_bytes(torch.device("cpu"))
    dist.barrier()
    return resident


def runtime_bytes(degrees: dict[str, int]) -> float:
    """Resident bytes of a bare rank (imports, process group, the mesh of ``degrees``; no model),
    the most of any rank."""
    from usp.launch import launch_ranks

    with allocator_environment():
        per_rank = launch_ranks(math.prod(degrees.values()), _runtime_worker, degrees,
                                name="usp-runtime-bytes")
    return max(per_rank)


def check_row(row: Row, runtime: float, steps: int = 2) -> dict:
    """Predicted and measured per-rank bytes of ``row``: the heaviest rank, last step."""
    workload, config = row.workload(), row.config()
    with allocator_environment():
        records = train_records(row.run_spec(steps))
    last = records[-1]
    peak = max(last["peak_memory_bytes"])
    rank = last["peak_memory_bytes"].index(peak)
    predicted = memory_per_gpu(workload, config)
    resting = resting_memory(workload, config)
    return {
        "row": row.label(), "config": config.label(), "runtime": runtime,
        "predicted": runtime + sum(predicted.values()), "measured": peak,
        "predicted_parts": predicted,
        "predicted_before": runtime + resting,
        "measured_before": last["memory_before_step_bytes"][rank],
        "step_time_s": sum(r["step_time_s"] for r in records[1:] or records)
        / len(records[1:] or records),
    }


def format_table(results: list[dict], tolerance: float) -> str:
    """One line per row: MiB predicted vs measured, total and its two measurable parts."""
    header = (f"{'row':<40} {'runtime':>7} {'pred':>6} {'meas':>6} {'ratio':>6} "
              f"{'before p/m':>11} {'step part p/m':>13} {'ratio':>6}  parts predicted "
              "(params/grads/optim/act)")
    lines = [header, "-" * len(header)]
    for r in results:
        ratio = r["predicted"] / r["measured"]
        step_pred = r["predicted"] - r["predicted_before"]
        step_meas = r["measured"] - r["measured_before"]
        parts = "/".join(f"{v / MIB:.0f}" for v in r["predicted_parts"].values())
        flag = "" if abs(ratio - 1) <= tolerance else "  MISS"
        lines.append(
            f"{r['row']:<40} {r['runtime'] / MIB:>7.0f} {r['predicted'] / MIB:>6.0f} "
            f"{r['measured'] / MIB:>6.0f} {ratio:>6.2f} "
            f"{r['predicted_before'] / MIB:>5.0f}/{r['measured_before'] / MIB:<5.0f} "
            f"{step_pred / MIB:>6.0f}/{step_meas / MIB:<6.0f} "
            f"{step_pred / max(step_meas, 1):>6.2f}  {parts}{flag}")
    return "\n".join(lines)

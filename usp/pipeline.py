"""Pipeline parallelism over the ``pp`` axis, with ``torch.distributed.pipelining``.

The model is cut by layers: stage ``i`` of ``pp`` keeps the contiguous run of decoder layers
:func:`stage_layer_names` gives it (their names keep their global index, so checkpoints do not
depend on ``pp``), the first stage keeps the embedding and the last the final norm and output
projection. How a model is cut is its family's (``usp.models.family.ModelPlan.keep_stage``);
each stage is then parallelised like a whole model (USP attention, TP, checkpointing, FSDP2 over
dp × ring × ulysses inside the stage).

Every rank of a pipeline holds the same tokens; the batch rows are cut into micro-batches that
flow through the stages (1F1B or GPipe). Positions and documents travel beside the activations
as keyword arguments to every stage. The last stage computes each micro-batch's share of the
exact global-mean loss (``usp.losses.LossHead.share``: from full logits, in chunks or split over
the vocabulary); gradients are not rescaled by the schedule, because the shares already add up
to the global mean.

Stages exchange fixed shapes, given to the stages up front (static metadata): the stages'
forward runs usp attention, whose collectives cannot run on the meta tensors of torch's dynamic
shape inference.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from usp.loss import global_label_count
from usp.losses import LossHead
from usp.topology import DATA_AXES, Topology

logger = logging.getLogger(__name__)

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


def stage_layer_names(n_layers: int, pp: int, stage: int) -> list[str]:
    """The decoder layers of ``stage``: contiguous, the first ``n_layers % pp`` stages one more."""
    if n_layers < pp:
        raise ValueError(f"n_layers={n_layers} < pp={pp}: every pipeline stage needs a layer")
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    count = base + (1 if stage < extra else 0)
    return [str(i) for i in range(start, start + count)]


def check_pipeline(pp: int, local_batch: int, microbatches: int, schedule: str) -> None:
    """Raise ValueError, naming the numbers, unless this batch can run through ``pp`` stages.

    (Whether the model can be cut into ``pp`` stages is its family's check,
    ``usp.models.family.ModelPlan.check``.)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be a positive integer")
    if microbatches < pp and schedule == "1f1b":
        raise ValueError(f"microbatches={microbatches} < pp={pp}: 1F1B needs at least one per stage")
    if local_batch % microbatches != 0:
        raise ValueError(
            f"each pipeline holds {local_batch} batch rows, which microbatches={microbatches} "
            f"cannot split evenly; use a global batch that is a multiple of dp x {microbatches}"
        )


class Pipeline:
    """This rank's stage and its schedule; :meth:`step` runs forward and backward of a batch."""

    def __init__(self, stage_module: nn.Module, topology: Topology, device: torch.device,
                 microbatches: int, schedule: str = "1f1b", loss: LossHead = LossHead()) -> None:
        """``stage_module``: ``usp.parallelize``'s stage of a model whose ``hidden_size`` (the
        width of the residual stream stages exchange) and ``vocab_size`` it reads."""
        self.module = stage_module
        self.loss = loss  # how the last stage meets the output projection (usp.losses)
        self.topology = topology
        self.device = device
        self.microbatches = microbatches
        self.schedule_name = schedule
        self.stage_index = topology.rank("pp")
        self.num_stages = topology.size("pp")
        self._schedules: dict[tuple, object] = {}
        self._global_count: torch.Tensor | None = None

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss.share(logits, labels, self._global_count, self.module, self.topology)

    def _schedule(self, input_ids: torch.Tensor, dtype: torch.dtype):
        batch, seq = input_ids.shape
        key = (batch, seq, dtype)
        if key not in self._schedules:
            check_pipeline(self.num_stages, batch, self.microbatches, self.schedule_name)
            width, vocab = self.module.hidden_size, self.module.vocab_size
            micro = batch // self.microbatches
            tp = self.topology.size("tp")
            # stage boundaries carry the residual stream: [B_mb, S_local / tp, hidden]
            # (requires_grad: a stage sends back the gradient of what it received)
            hidden = torch.empty(micro, seq // tp, width, dtype=dtype, device="meta",
                                 requires_grad=True)
            ids = torch.empty(micro, seq, dtype=input_ids.dtype, device="meta")
            size = self.loss.output_size(vocab, width, tp)
            logits = torch.empty(micro, seq, size, dtype=torch.float32, device="meta")
            stage = PipelineStage(
                self.module, self.stage_index, self.num_stages, self.device,
                input_args=ids if self.is_first else hidden,
                output_args=logits if self.is_last else hidden,
                group=self.topology.group("pp"),
            )
            self._schedules[key] = SCHEDULES[self.schedule_name](
                stage, self.microbatches, loss_fn=self._loss, scale_grads=False
            )
        return self._schedules[key]

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
             documents: torch.Tensor | None = None,
             activation_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns the global-mean loss (all ranks)."""
        schedule = self._schedule(input_ids, activation_dtype)
        self._global_count = global_label_count(labels, self.topology)
        kwargs = {"position_ids": position_ids, **self.loss.model_kwargs()}
        if documents is not None:
            kwargs["documents"] = documents
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.is_first else ()
        if self.is_last:
            schedule.step(*args, target=labels, losses=losses, **kwargs)
        else:
            schedule.step(*args, **kwargs)
        share = torch.stack(losses).sum().detach().double() if losses else (
            torch.zeros((), dtype=torch.float64, device=input_ids.device))
        # the last stage of every pipeline holds its share of the global mean; add them up over
        # dp × ring × ulysses and hand the result to every stage
        dist.all_reduce(share, group=self.topology.flat_mesh("pp", *DATA_AXES).get_group())
        return share.float()

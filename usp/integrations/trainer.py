"""USP inside Hugging Face's ``Trainer`` and TRL's ``SFTTrainer``: two added lines.

    USPTrainer = with_usp(Trainer)                       # or with_usp(SFTTrainer)
    trainer = USPTrainer(model=model, args=args, ..., usp=USPArguments(ring=2, ulysses=2))

Launched with ``torchrun`` or ``accelerate launch``, each rank then

- lays ``dp × ring × ulysses`` over the world (:meth:`usp.Topology.build`; dp is the rest);
- checks the model and swaps its attention for ``"usp"`` (:meth:`USPContext.prepare`);
- reads the batches of its **dp** rank only, so every rank of a sequence group holds the same
  samples (:mod:`usp.integrations.trainer_data`), and keeps its part of each sequence, labels
  shifted before the split (:mod:`usp.integrations.trainer_batch`);
- computes the loss whose value is the exact mean over every label of every rank and
  micro-batch of the optimizer step, and whose gradient is this rank's share of it, scaled by the
  number of ranks DDP or FSDP2 average gradients over, so that their average is the exact sum.

Options the integration cannot honour exactly are refused with a ValueError on every rank before
the first step (an accelerate ``ParallelismConfig`` with cp/sp/tp, DeepSpeed, FSDP1, a custom
loss, metrics that need the full logits...), never run approximately.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import Trainer

from usp.comm import collective_device
from usp.integrations.trainer_batch import label_count, shard_batches
from usp.integrations.trainer_data import (
    DataOverDataRanks, GatherOverDataRanks, check_data_options, without_repeated_samples,
)
from usp.integrations.transformers import USPContext
from usp.integrations.hf_moe import router_settings
from usp.loss import cross_entropy_sum
from usp.topology import DATA_AXES, Topology

# DDP averages gradients over its processes, FSDP2 over its mesh: both the whole world here
AVERAGING = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
             DistributedType.MULTI_XPU, DistributedType.MULTI_NPU, DistributedType.MULTI_MLU,
             DistributedType.MULTI_HPU, DistributedType.FSDP)


@dataclass
class USPArguments:
    """How a usp trainer splits the sequence: ``ring × ulysses`` ranks per sequence (the other
    factor of the world is data parallel), the token ``layout`` and the attention ``kernel``;
    ``ring_layout``: the layout ring attention runs on when not ``layout``'s (a hybrid's
    ``contiguous`` scans beside balanced attention: ``usp_attention``'s ``ring_layout``)."""

    ring: int = 1
    ulysses: int = 1
    layout: str = "zigzag"
    kernel: str = "auto"
    placement: str = "head-first"
    ring_layout: str | None = None


class USPTrainerMixin:
    """Put it before a ``transformers.Trainer`` subclass (or use :func:`with_usp`); the trainer
    takes one more keyword, ``usp=USPArguments(...)``."""

    # the loss is normalised over the whole accumulated batch already: the Trainer must not divide
    # it by the accumulation steps (transformers 5.19 and later read this; older versions read
    # model_accepts_loss_kwargs, set in __init__)
    loss_is_scaled_for_ga = True

    def __init__(self, *args, usp: USPArguments | None = None, **kwargs) -> None:
        self.usp_arguments = USPArguments() if usp is None else usp
        super().__init__(*args, **kwargs)
        check_trainer_options(self)
        self.model_accepts_loss_kwargs = True
        model = self._usp_model()
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"{type(model).__name__} is not a transformers PreTrainedModel; usp swaps the "
                "attention of transformers models (attn_implementation='usp')"
            )
        self.usp_context.prepare(model)

    # ------------------------------------------------------------------ set-up
    def create_accelerator_and_postprocess(self) -> None:
        check_parallelism_config(self.args.parallelism_config)
        super().create_accelerator_and_postprocess()
        accelerator = self.accelerator
        check_parallelism_config(accelerator.parallelism_config)
        check_data_options(accelerator)
        if accelerator.distributed_type not in AVERAGING:
            raise ValueError(
                f"accelerate runs {accelerator.distributed_type.value}; a usp trainer syncs "
                "gradients with DDP or FSDP2 (fsdp_config={'version': 2}), which average over "
                "every rank"
            )
        if getattr(accelerator.state, "fsdp_plugin", None) is not None and \
                accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError("FSDP1 is not supported by usp trainers: use FSDP2, "
                             "fsdp_config={'version': 2}")
        arguments = self.usp_arguments
        topology = Topology.build(ring=arguments.ring, ulysses=arguments.ulysses,
                                  placement=arguments.placement)
        self.usp_context = USPContext(topology, layout=arguments.layout, kernel=arguments.kernel,
                                      ring_layout=arguments.ring_layout)
        # the number of ranks DDP / FSDP2 divide the summed gradients by
        self.usp_gradient_scale = accelerator.num_processes
        accelerator.prepare_data_loader = DataOverDataRanks(accelerator, topology)

    def get_total_train_batch_size(self, args) -> int:
        """Samples per optimizer step: the batches of the dp ranks (not of every process)."""
        dp = self.usp_context.topology.size("dp")
        return self._train_batch_size * args.gradient_accumulation_steps * dp

    # ------------------------------------------------------------------ training
    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The optimizer step's micro-batches, each already this rank's shard, and the number
        of labels that carry loss in all of them on every rank (the loss divides by it)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        shards = shard_batches(self.usp_context, batches)
        return shards, self._global_label_count(shards)

    def compute_loss(self, model, inputs, return_outputs: bool = False,
                     num_items_in_batch=None):
        """``inputs``: a shard from :meth:`get_batch_samples`. Value: this micro-batch's share of
        the step's exact global mean (the same on every rank); gradient: this rank's share,
        times the ranks DDP / FSDP2 average over."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        count = (self._global_label_count([{"labels": labels}]) if num_items_in_batch is None
                 else float(num_items_in_batch))
        outputs = model(**inputs, usp_context=self.usp_context, use_cache=False)
        local_sum = cross_entropy_sum(outputs.logits, labels)
        global_sum = self._all_reduce(local_sum.detach().double())
        loss = _StepShare.apply(local_sum, global_sum, max(count, 1.0), self.usp_gradient_scale)
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None:  # a mixture-of-experts router loss, added as transformers adds it
            # (to each micro-batch's loss); already the whole batch's (USPContext.prepare)
            term = router_settings(self._usp_model())[2] * aux.to(loss.dtype)
            loss = loss + term.detach() + (term - term.detach()) * self.usp_gradient_scale
        return (loss, outputs) if return_outputs else loss

    def _usp_model(self):
        """The transformers model under any wrapper (PEFT's included)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The loss of one evaluation batch: its exact mean over every rank's labels."""
        if not prediction_loss_only:
            raise ValueError(
                "a usp trainer evaluates the loss only: each rank holds a shard of the logits in "
                "the layout's order; call evaluate() without compute_metrics (predict() needs "
                "the full logits)"
            )
        inputs = without_repeated_samples(inputs, self.accelerator, self.usp_context.topology,
                                          self.args.eval_batch_size)
        (shard,) = shard_batches(self.usp_context, [inputs])
        count = self._global_label_count([shard])
        shard = self._prepare_inputs(shard)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, shard, num_items_in_batch=count)
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        # the Trainer restores its own gather at the end of every evaluation loop
        self.gather_function = GatherOverDataRanks(self.accelerator, self.usp_context.topology)
        return super().evaluation_loop(*args, **kwargs)

    # ------------------------------------------------------------------ collectives
    def _global_label_count(self, shards: list[dict]) -> float:
        return float(self._all_reduce(label_count(shards)))

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over dp × ring × ulysses (every rank holds different tokens)."""
        topology = self.usp_context.topology
        if topology.data_size == 1:
            return value
        group = topology.flat_mesh(*DATA_AXES).get_group()
        # a copy: all_reduce works in place, and .double() of an fp64 loss is the loss itself
        value = value.to(collective_device(group), copy=True)
        dist.all_reduce(value, group=group)
        return value


class _StepShare(torch.autograd.Function):
    """Value ``global_sum / count``; gradient ``gradient_scale / count`` × d(local_sum)."""

    @staticmethod
    def forward(ctx, local_sum, global_sum, count, gradient_scale):
        ctx.factor = gradient_scale / count
        return (global_sum / count).to(device=local_sum.device, dtype=local_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None, None, None


@functools.cache
def with_usp(trainer_class: type) -> type:
    """``trainer_class`` (``Trainer``, TRL's ``SFTTrainer``, a subclass of yours) with usp:
    its constructor takes ``usp=USPArguments(...)``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_usp takes a transformers Trainer class, got {trainer_class!r}")
    return type(f"USP{trainer_class.__name__}", (USPTrainerMixin, trainer_class),
                {"__doc__": f"{trainer_class.__name__} with USP sequence parallelism."})


def check_parallelism_config(config) -> None:
    """accelerate's own sequence/context/tensor parallelism would split the batch a second time."""
    if config is None:
        return
    for name in ("cp_size", "sp_size", "tp_size"):
        size = getattr(config, name, None) or 1
        if size > 1:
            raise ValueError(
                f"accelerate's ParallelismConfig has {name}={size}; a usp trainer splits the "
                "sequence itself (USPArguments ring x ulysses): leave cp_size, sp_size and tp_size "
                "at 1"
            )


def check_trainer_options(trainer) -> None:
    """Trainer options whose result would differ under a split sequence (the same on every
    rank, so every rank raises)."""
    args = trainer.args
    refused = {
        "compute_metrics": trainer.compute_metrics is not None,
        # TRL's trainers set a non-callable placeholder on transformers < 5.19
        "compute_loss_func": callable(trainer.compute_loss_func),
        f"label_smoothing_factor={args.label_smoothing_factor}": args.label_smoothing_factor != 0,
        f"neftune_noise_alpha={args.neftune_noise_alpha}": args.neftune_noise_alpha is not None,
        f"loss_type={getattr(args, 'loss_type', 'nll')!r}":
            getattr(args, "loss_type", "nll") not in (None, "nll"),
        f"n_gpu={args.n_gpu} (nn.DataParallel)": args.n_gpu > 1,
        "a model sharded at load time": getattr(trainer, "is_distributed_loading_by_transformers",
                                                False),
    }
    names = [name for name, present in refused.items() if present]
    if names:
        raise ValueError(
            f"a usp trainer cannot honour {', '.join(names)}: each rank holds a part of every "
            "sequence, the loss is the plain cross-entropy as the exact token mean over all ranks "
            "and evaluation computes that loss only; remove it"
        )

"""Data over the dp ranks only, for :mod:`usp.integrations.trainer`.

accelerate splits a data loader over every process: with sequence parallelism the ranks of one
sequence group would each read different samples and split them as if they were one sequence.
Here the loader is split over the dp ranks only (``BatchSamplerShard`` / ``IterableDatasetShard``
with ``num_processes = dp``), so every rank of a sequence group reads the same batch, and the
evaluation's gather of losses runs over dp with the same rule for the last, shorter batch that
accelerate's ``gather_for_metrics`` applies over its processes.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader

from usp.batch import IGNORE_INDEX
from usp.topology import Topology

logger = logging.getLogger(__name__)


class DataOverDataRanks:
    """Stands in for ``Accelerator.prepare_data_loader`` on one accelerator (the Trainer prepares
    its loaders through ``accelerator.prepare``): the same loader, split over dp only, its batches
    left on the host (the trainer shards them there and moves only the shard)."""

    def __init__(self, accelerator, topology: Topology) -> None:
        self.accelerator, self.topology = accelerator, topology

    def __call__(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
        accelerator = self.accelerator
        if getattr(data_loader, "_is_accelerate_prepared", False):
            if data_loader not in accelerator._dataloaders:
                accelerator._dataloaders.append(data_loader)
            return data_loader
        prepared = prepare_data_loader(
            data_loader,
            accelerator.device,
            num_processes=self.topology.size("dp"),
            process_index=self.topology.rank("dp"),
            split_batches=accelerator.split_batches,
            put_on_device=False,
            rng_types=accelerator.rng_types.copy(),
            dispatch_batches=False,
            even_batches=accelerator.even_batches,
            use_seedable_sampler=accelerator.use_seedable_sampler,
            data_seed=accelerator.dataloader_config.data_seed,
            non_blocking=accelerator.non_blocking,
            use_stateful_dataloader=accelerator.use_stateful_dataloader,
        )
        accelerator._dataloaders.append(prepared)
        return prepared


def check_data_options(accelerator) -> None:
    """Refuse the loader options under which sequence groups could read different batches."""
    if accelerator.dispatch_batches:
        raise ValueError(
            "dispatch_batches=True: accelerate would send each process its own slice of one "
            "batch, but the ranks of a sequence group need the same batch; set "
            "accelerator_config={'dispatch_batches': False}"
        )
    if not accelerator.even_batches:
        raise ValueError(
            "even_batches=False lets the dp ranks run different numbers of batches, which leaves "
            "the others waiting in a collective; set accelerator_config={'even_batches': True}"
        )


class GatherOverDataRanks:
    """``gather_for_metrics`` over the dp ranks: each rank's loss is the batch's global mean
    already (the same on every rank of a sequence group), so one copy per dp rank, less the
    last batch's samples that the loader repeated to fill it."""

    def __init__(self, accelerator, topology: Topology) -> None:
        self.accelerator, self.topology = accelerator, topology

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.topology.size("dp") > 1:
            pieces = [torch.empty_like(tensor) for _ in range(self.topology.size("dp"))]
            dist.all_gather(pieces, tensor.contiguous(), group=self.topology.group("dp"))
            tensor = torch.cat(pieces)
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            tensor = tensor[: state.remainder]
        return tensor


def without_repeated_samples(batch: dict, accelerator, topology: Topology,
                             batch_size: int) -> dict:
    """The last batch of a loader split over dp is filled up with samples from the start of
    the data, so that every dp rank has ``batch_size`` of them; their labels become -100, so the
    loss is that of the real samples only. Rows are told apart in padded batches (a row per
    sample); inside packed rows they cannot be, and the repeats count (a warning says so)."""
    state, dp = accelerator.gradient_state, topology.size("dp")
    if dp == 1 or not state.end_of_dataloader or state.remainder <= 0 or "labels" not in batch:
        return batch
    real = min(max(state.remainder - topology.rank("dp") * batch_size, 0), batch_size)
    labels = batch["labels"]
    if real == batch_size:
        return batch
    if labels.shape[0] == batch_size or real == 0:
        labels = labels.clone()
        labels[real:] = IGNORE_INDEX
        return {**batch, "labels": labels}
    logger.warning(
        "the last batch of dp rank %d holds %d repeated samples inside packed rows, which "
        "cannot be told apart: they count in this batch's loss (use an evaluation set whose "
        "size is a multiple of %d for an exact loss)", topology.rank("dp"), batch_size - real,
        batch_size * dp)
    return batch

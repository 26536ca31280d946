"""Gradient accumulation: one optimizer step's batch as K micro-batches, each forward and backward.

The loss stays the exact global mean over all K micro-batches: the label count of the whole
batch is all-reduced once, and each micro-batch contributes its share (its sum over that count,
``usp.losses.LossHead.share``), so the K backward passes add up to the gradient of the global
mean and the K shares, summed over the ranks, to its value. FSDP2 reduce-scatters the gradients
in the last backward only (``set_requires_gradient_sync``): the backward passes before it
accumulate unsharded gradients on each rank, which costs one unsharded copy of the gradients and
saves K - 1 reduce-scatters per step.

A loss the model adds to the cross-entropy (``auxiliary_loss``, a mixture-of-experts router loss)
enters each micro-step's backward, and the step's value, once: it is the whole batch's already.

Each micro-batch's forward runs under the step's autocast, the saved-activation count and, on
CUDA, activation offload to host memory (``usp.memory.ActivationOffload``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from usp.loss import global_label_count
from usp.losses import LossHead
from usp.memory import ActivationOffload
from usp.topology import Topology
from usp.training.metrics import SavedActivations


def check_accumulation(global_batch: int, dp: int, grad_accum: int, pp: int) -> None:
    """ValueError, naming the numbers, unless ``grad_accum`` (>= 1, ``usp.training.optim``)
    micro-batches can split the batch."""
    if grad_accum > 1 and pp > 1:
        raise ValueError(
            f"--grad-accum={grad_accum} with pp={pp}: the pipeline already runs the batch as "
            "micro-batches and accumulates their gradients; use --microbatches instead"
        )
    if global_batch % (dp * grad_accum) != 0:
        raise ValueError(
            f"--global-batch={global_batch} is not divisible by dp={dp} x --grad-accum="
            f"{grad_accum} = {dp * grad_accum}: every micro-step takes the same number of rows "
            f"on every dp rank; use a multiple of {dp * grad_accum}"
        )


def split_micro_batches(batch: dict, count: int) -> list[dict]:
    """This rank's batch (``usp.batch.shard_batch``'s) as ``count`` micro-batches of its rows;
    a one-row ``documents`` that every row shares is shared by every micro-batch."""
    rows = batch["input_ids"].shape[0]
    if rows % count != 0:
        raise ValueError(f"{rows} batch rows on this rank cannot split into {count} micro-batches")
    size = rows // count
    return [
        {name: tensor[index * size:(index + 1) * size] if tensor.shape[0] == rows else tensor
         for name, tensor in batch.items()}
        for index in range(count)
    ]


def train_micro_batches(
    model: nn.Module, micro_batches: list[dict], topology: Topology, head: LossHead, *,
    autocast_dtype: torch.dtype | None = None, offload_device: torch.device | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward of every micro-batch; gradients accumulate in the parameters.

    Returns the global-mean loss over all micro-batches of all ranks (fp64, the same on every
    rank) and the most bytes autograd saved for one micro-batch's backward on this rank.
    ``offload_device``: keep saved activations in host memory (a CUDA device; ValueError else).
    """
    labels = torch.cat([micro["labels"] for micro in micro_batches])
    count = global_label_count(labels, topology)
    total = torch.zeros((), dtype=torch.float64, device=labels.device)
    auxiliary_total = torch.zeros_like(total)  # already the whole batch's on every rank
    saved_bytes = 0
    for index, micro in enumerate(micro_batches):
        if isinstance(model, FSDPModule):  # reduce-scatter in the last backward only
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        counter = SavedActivations()
        hooks = counter if offload_device is None else ActivationOffload(offload_device,
                                                                         counter.count)
        autocast = torch.autocast(labels.device.type, dtype=autocast_dtype,
                                  enabled=autocast_dtype is not None)
        with hooks, autocast:
            output = model(micro["input_ids"], micro["position_ids"], micro.get("documents"),
                           **head.model_kwargs())
            share = head.share(output, micro["labels"], count, model, topology)
            # a loss the model adds (a router loss): the step's is the mean of its
            # micro-batches'; its value is the whole batch's, its gradient this rank's share
            auxiliary = getattr(model, "auxiliary_loss", None)
        del output  # the graph keeps what the backward needs
        if auxiliary is None:
            share.backward()
        else:
            (share + auxiliary / len(micro_batches)).backward()
            auxiliary_total += auxiliary.detach().double() / len(micro_batches)
        total += share.detach().double()
        saved_bytes = max(saved_bytes, counter.bytes)
    return topology.sum_over_data(total) + auxiliary_total, saved_bytes


def rank_batch(run, global_batch) -> dict:
    """This rank's part of a global batch (``usp.data.PackedBatch``: tokens, targets with the
    loss mask applied, documents) on the run's device: ids, labels, positions and (packing on)
    the documents."""
    from usp.batch import shard_batch

    documents = global_batch.documents if run.step.separate_documents else None
    batch = shard_batch(global_batch.tokens, run.topology, run.step.layout,
                        targets=global_batch.targets, documents=documents)
    # the documents only shape attention masks, which live on the host: moving them to the GPU
    # would make every step's mask copy them back (a wait for the device)
    return {name: tensor if name == "documents" else tensor.to(run.device)
            for name, tensor in batch.items()}

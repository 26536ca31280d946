"""The model of a run, built sharded: checked, built on the meta device, parallelised, and only
then materialised, each rank initialising (or reading) its own shards.

A model is never whole on any rank: its skeleton lives on the meta device (shapes, no storage)
while ``usp.parallelize`` cuts the pipeline stage and shards it (TP, FSDP2); ``to_empty`` then
allocates this rank's shards only, and ``init_weights(seed)`` fills them with exactly the values a
single process would give the whole model (``usp.models.init``), or the family's pretrained
weights are read into them (``usp.models.family.Weights``).

Everything that depends on the kind of model is its family's (``usp.models.registry``, through
``usp.inputs.model``): this module hands the family the run's model settings and never asks which
family it is.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from usp.inputs.model import model_family, model_settings
from usp.models.counts import bytes_text, count_text, parameter_bytes
from usp.models.init import materialize
from usp.parallel import parallelize
from usp.spec import Memory, Model, Parallel
from usp.topology import Topology

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- building
def fsdp_precision(dtype: str, device: torch.device, topology: Topology):
    """FSDP2's ``(param_dtype, reduce_dtype)``: for bf16 on CUDA it keeps fp32 master weights
    (and the optimizer's state), gathers bf16 copies to compute with and reduces gradients in
    fp32; otherwise (fp32, a CPU, or nothing to shard) ``(None, None)`` and autocast alone casts."""
    if dtype == "bf16" and device.type == "cuda" and topology.data_size > 1:
        return torch.bfloat16, torch.float32
    return None, None


def build_model(section: Model, parallel: Parallel, memory: Memory, topology: Topology,
                device: torch.device, *, seq_len: int, seed: int,
                load_weights: bool = True) -> tuple[nn.Module, float]:
    """The run's model (its ``model`` section), parallelised by the ``parallel`` and ``memory``
    sections and materialised; and its training FLOPs per token at ``seq_len``.

    ``load_weights=False``: do not read the pretrained weights (a checkpoint will replace them).
    """
    param_dtype, reduce_dtype = fsdp_precision(section.dtype, device, topology)
    settings, family = model_settings(section), model_family(section)
    model = family.skeleton(settings)
    flops_per_token = family.flops_per_token(model, seq_len)
    parameters = model.num_params()  # the whole model's, before any cut or shard
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # also in one process: the memory features (checkpointing, tiled MLP, loss) apply there too
    model = parallelize(
        model, topology, layout=parallel.layout, kernel=parallel.kernel,
        ring_layout=parallel.ring_layout,
        activation_checkpointing=memory.ac, tiled_mlp=memory.tiled_mlp, loss=memory.loss,
        fsdp=True, reshard_after_forward=parallel.zero == 3, param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
    )
    pretrained = family.pretrained(settings) if load_weights else None
    materialize(model, device, seed, pretrained)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("model %s: %s parameters%s, %s (%s held by rank 0)",
                    family.display_name(settings), count_text(parameters),
                    f" ({count_text(trainable)} trained: LoRA rank {settings.lora_rank})"
                    if settings.lora_rank else "",
                    f"read from {pretrained}" if pretrained else f"initialised from seed "
                    f"{seed}", bytes_text(parameter_bytes(model)))
    return model, flops_per_token

"""The model of a run, built sharded: checked, built on the meta device, parallelised, and only
then materialised, each rank initialising (or reading) its own shards.

A model is never whole on any rank: its skeleton lives on the meta device (shapes, no storage)
while ``usp.parallelize`` cuts the pipeline stage and shards it (TP, FSDP2); ``to_empty`` then
allocates this rank's shards only, and ``init_weights(seed)`` fills them with exactly the values a
single process would give the whole model (``usp.models.init``), or the family's pretrained
weights are read into them (``usp.models.family.Weights``).

Everything that depends on the kind of model is its family's (``usp.models.registry``): this
module hands the family the run's model settings and never asks which family it is.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from usp.loss import data_parallel_size
from usp.models import init
from usp.models.family import ModelFamily, ModelSettings
from usp.models.registry import family_of, family_of_model
from usp.parallel import parallelize
from usp.spec import Memory, Model, Parallel
from usp.topology import AXES, Topology
from usp.inputs.byte_tokens import BYTE_VOCAB_SIZE

logger = logging.getLogger(__name__)


def model_settings(model: Model) -> ModelSettings:
    """What the model families read of a run's model section: which model it is."""
    return ModelSettings(model=model.model, hf_config=model.hf_config, hf_model=model.hf_model)


def model_family(model: Model) -> ModelFamily:
    """The family of the run's model."""
    return family_of(model_settings(model))


def model_name(model: Model) -> str:
    """The run's model as logs and checkpoints name it."""
    return model_family(model).display_name(model_settings(model))


def pretrained_source(model: Model) -> str | None:
    """The folder the run's first weights come from; None: initialised from the seed."""
    return model_family(model).pretrained(model_settings(model))


# ---------------------------------------------------------------------------- validation
def validate_model(model: Model, topology: Topology, cuda: bool, loss: str) -> None:
    """Raise ValueError, with the numbers, unless the model, its weights and the tokenizer fit
    ``topology`` (sizes only), each other and this machine's memory. Pure: reads files, never
    tensor data; the model's sizes are checked before anything is built."""
    from usp.inputs import model_size

    settings, family = model_settings(model), model_family(model)
    name = family.display_name(settings)
    size = family.size(settings)
    world_size = math.prod(topology.size(axis) for axis in AXES)
    model_size.check_training_memory(name, size.parameters, world_size, cuda)
    ids = BYTE_VOCAB_SIZE
    if model.tokenizer:
        from usp.inputs.tokenizer import check_vocab, largest_id, load_tokenizer

        tokenizer = load_tokenizer(model.tokenizer)
        check_vocab(tokenizer, model.tokenizer, size.vocab_size, name)
        ids = largest_id(tokenizer) + 1
    family.validate(settings, topology, ids)
    family.plan.check_loss(loss, name)
    source = family.pretrained(settings)
    if source is not None:
        family.weights.check(source, family.skeleton(settings))


def model_metadata(model: Model) -> tuple[str, dict]:
    """The model's name and its config as JSON data, for the checkpoint's record."""
    settings, family = model_settings(model), model_family(model)
    return family.display_name(settings), family.metadata(settings)


def tokenizer_metadata(model: Model) -> dict | None:
    """The tokenizer's record (class, size, EOS, fingerprint); None for byte-level tokens."""
    if not model.tokenizer:
        return None
    from usp.inputs.tokenizer import load_tokenizer, tokenizer_record

    return tokenizer_record(load_tokenizer(model.tokenizer))


# ---------------------------------------------------------------------------- building
def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards of DTensors, tied ones once (on the
    meta device too: shapes are enough)."""
    total = 0
    for parameter in model.parameters():  # distinct parameters: a tied one comes once
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total


def count_text(count: int) -> str:
    """``1234567`` -> ``"1.2M"``: a parameter count as people write it."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def bytes_text(size: int) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1."""
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if size >= scale:
            return f"{size / scale:.1f} {suffix}"
    return f"{size} bytes"


def materialize(model: nn.Module, device: torch.device, seed: int,
                pretrained: str | None = None) -> nn.Module:
    """Allocate this rank's shards of a meta-device model on ``device`` and initialise them from
    ``seed``, or read them from ``pretrained`` with the model's family's weights reader. In
    place; returns it."""
    init.to_empty(model, device)  # tied parameters stay tied
    if pretrained is None:
        model.init_weights(seed)
    else:
        family_of_model(model).weights.load(model, pretrained)
    return model


def fsdp_precision(dtype: str, device: torch.device, topology: Topology):
    """FSDP2's ``(param_dtype, reduce_dtype)``: for bf16 on CUDA it keeps fp32 master weights
    (and the optimizer's state), gathers bf16 copies to compute with and reduces gradients in
    fp32; otherwise (fp32, a CPU, or nothing to shard) ``(None, None)`` and autocast alone casts."""
    if dtype == "bf16" and device.type == "cuda" and data_parallel_size(topology) > 1:
        return torch.bfloat16, torch.float32
    return None, None


def build_model(section: Model, parallel: Parallel, memory: Memory, topology: Topology,
                device: torch.device, *, seq_len: int, seed: int,
                load_weights: bool = True) -> tuple[nn.Module, float]:
    """The run's model (its ``model`` section), parallelised by the ``parallel`` and ``memory``
    sections and materialised; and its training FLOPs per token at ``seq_len``.

    ``load_weights=False``: do not read the pretrained weights (a checkpoint will replace them).
    """
    settings, family = model_settings(section), model_family(section)
    model = family.skeleton(settings)
    flops_per_token = family.flops_per_token(model, seq_len)
    parameters = model.num_params()  # the whole model's, before any cut or shard
    param_dtype, reduce_dtype = fsdp_precision(section.dtype, device, topology)
    # also in one process: the memory features (checkpointing, tiled MLP, loss) apply there too
    model = parallelize(
        model, topology, layout=parallel.layout, kernel=parallel.kernel,
        activation_checkpointing=memory.ac, tiled_mlp=memory.tiled_mlp, loss=memory.loss,
        fsdp=True, reshard_after_forward=parallel.zero == 3, param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
    )
    pretrained = family.pretrained(settings) if load_weights else None
    materialize(model, device, seed, pretrained)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("model %s: %s parameters, %s (%s held by rank 0)",
                    family.display_name(settings), count_text(parameters),
                    f"read from {pretrained}" if pretrained else f"initialised from seed "
                    f"{seed}", bytes_text(parameter_bytes(model)))
    return model, flops_per_token

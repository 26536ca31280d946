"""The model of a run, built sharded: checked, built on the meta device, parallelised, and only
then materialised, each rank initialising (or reading) its own shards.

A model is never whole on any rank: its skeleton lives on the meta device (shapes, no storage)
while ``usp.parallelize`` cuts the pipeline stage and shards it (TP, FSDP2); ``to_empty`` then
allocates this rank's shards only, and ``init_weights(seed)`` fills them with exactly the values a
single process would give the whole model (``usp.models.init``), or ``--hf-model``'s weights are
read into them (``usp.training.pretrained``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch import nn

from usp.loss import data_parallel_size
from usp.models import init
from usp.models.llama import Llama, get_config
from usp.parallel import check_parallel_config, parallelize
from usp.topology import Topology
from usp.training.data import BYTE_VOCAB_SIZE

logger = logging.getLogger(__name__)


def hf_source(config) -> str | None:
    """The Hugging Face config of the run: ``--hf-model``'s directory or ``--hf-config``."""
    return config.hf_model or config.hf_config


# ---------------------------------------------------------------------------- validation
def validate_model(config, topology: Topology) -> None:
    """Raise ValueError, with the numbers, unless the model, its weights and the tokenizer fit
    ``topology`` (sizes only) and each other. Pure: reads files, never tensor data."""
    if config.hf_model and config.hf_config:
        raise ValueError("--hf-model DIR reads its config from DIR/config.json; drop --hf-config")
    tokenizer = None
    if config.tokenizer:
        from usp.training.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer)
    source = hf_source(config)
    if source is None:
        llama = get_config(config.model)
        check_parallel_config(llama, topology)
        vocab_size, model_name = llama.vocab_size, config.model
    else:
        from usp.training.hf_model import load_hf_config, validate_hf_config

        vocab_size, model_name = load_hf_config(source).vocab_size, source
    if tokenizer is not None:
        from usp.training.tokenizer import check_vocab

        check_vocab(tokenizer, config.tokenizer, vocab_size, model_name)
    if source is not None:
        validate_hf_config(source, topology, len(tokenizer) if tokenizer else BYTE_VOCAB_SIZE)
    if config.hf_model:
        from usp.training.pretrained import check_pretrained

        check_pretrained(config.hf_model, skeleton(config))


def model_metadata(config) -> tuple[str, dict]:
    """The model's name and its config as JSON data, for the checkpoint's record."""
    source = hf_source(config)
    if source is None:
        return config.model, dataclasses.asdict(get_config(config.model))
    from usp.training.hf_model import hf_config_metadata

    return source, hf_config_metadata(source)


def tokenizer_metadata(config) -> dict | None:
    """The tokenizer's record (class, size, EOS, fingerprint); None for byte-level tokens."""
    if not config.tokenizer:
        return None
    from usp.training.tokenizer import load_tokenizer, tokenizer_record

    return tokenizer_record(load_tokenizer(config.tokenizer))


# ---------------------------------------------------------------------------- building
def skeleton(config) -> nn.Module:
    """The run's model on the meta device: every shape, no storage."""
    source = hf_source(config)
    if source is not None:
        from usp.training.hf_model import build_hf_causal_lm

        return build_hf_causal_lm(source, device="meta")
    with torch.device("meta"):
        return Llama(get_config(config.model))


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
    ``seed``, or read them from the Hugging Face directory ``pretrained``. In place; returns it."""
    init.to_empty(model, device)  # tied parameters stay tied
    if pretrained is None:
        model.init_weights(seed)
    else:
        from usp.training.pretrained import load_pretrained

        model.init_weights(seed, parameters=False)  # computed buffers only (RoPE tables)
        load_pretrained(model, pretrained)
    return model


def fsdp_precision(config, device: torch.device, topology: Topology):
    """FSDP2's ``(param_dtype, reduce_dtype)``: for bf16 on CUDA it keeps fp32 master weights
    (and the optimizer's state), gathers bf16 copies to compute with and reduces gradients in
    fp32; otherwise (fp32, a CPU, or nothing to shard) ``(None, None)`` and autocast alone casts."""
    if config.dtype == "bf16" and device.type == "cuda" and data_parallel_size(topology) > 1:
        return torch.bfloat16, torch.float32
    return None, None


def build_model(config, topology: Topology, device: torch.device,
                load_weights: bool = True) -> tuple[nn.Module, float]:
    """The run's model, parallelised and materialised; and its training FLOPs per token.

    ``load_weights=False``: do not read ``--hf-model``'s weights (a checkpoint will replace them).
    """
    model = skeleton(config)
    flops_per_token = model.flops_per_token(config.seq_len)
    parameters = model.num_params()  # the whole model's, before any cut or shard
    param_dtype, reduce_dtype = fsdp_precision(config, device, topology)
    # also in one process: the memory features (checkpointing, tiled MLP, loss) apply there too
    model = parallelize(
        model, topology, layout=config.layout, kernel=config.kernel,
        activation_checkpointing=config.ac, tiled_mlp=config.tiled_mlp, loss=config.loss,
        fsdp=True, reshard_after_forward=not config.zero2, param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
    )
    pretrained = config.hf_model if load_weights else None
    materialize(model, device, config.seed, pretrained)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("model %s: %s parameters, %s (%s held by rank 0)",
                    hf_source(config) or config.model, count_text(parameters),
                    f"read from {pretrained}" if pretrained else f"initialised from seed "
                    f"{config.seed}", bytes_text(parameter_bytes(model)))
    return model, flops_per_token

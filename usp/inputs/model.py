"""The model a run names (its spec's ``model`` section): its family, name, record and
pretrained source, and the check that it fits the topology, the tokenizer and this machine.

Everything that depends on the kind of model is its family's (``usp.models.registry``): this
module hands the family the run's model settings and never asks which family it is. The model
folder and the tokenizer are the user's files, read here without running any of their code.
"""

from __future__ import annotations

import math

from usp.inputs.byte_tokens import BYTE_VOCAB_SIZE
from usp.models.family import ModelFamily, ModelSettings
from usp.models.registry import family_of
from usp.spec import Model
from usp.topology import AXES, Topology


def model_settings(model: Model) -> ModelSettings:
    """What the model families read of a run's model section: which model it is, and its
    LoRA adapters."""
    return ModelSettings(model=model.model, hf_config=model.hf_config, hf_model=model.hf_model,
                         lora_rank=model.lora_rank, lora_alpha=model.lora_alpha,
                         lora_targets=tuple(model.lora_targets))


def check_lora(model: Model, family: ModelFamily) -> None:
    """ValueError, naming the numbers, for LoRA settings no run can use (the family checks the
    targets against its model)."""
    if model.lora_rank < 0 or model.lora_alpha < 0:
        raise ValueError(f"--lora-rank={model.lora_rank} and --lora-alpha={model.lora_alpha} "
                         "must be >= 0 (rank 0: no adapters; alpha 0: twice the rank)")
    if not model.lora_rank:
        return
    if not family.lora:
        raise ValueError(f"--lora-rank={model.lora_rank}: LoRA adapters are offered for Hugging "
                         f"Face models only, not for the Llama preset --model {model.model}; "
                         "train a Hugging Face model with --hf-model DIR or --hf-config")
    if not model.lora_targets:
        raise ValueError(f"--lora-rank={model.lora_rank} with no --lora-targets; name the "
                         "layers to adapt, or all-linear")


def lora_metadata(model: Model) -> dict | None:
    """The adapters a run trains, as its checkpoints record them (None: no adapters, every
    weight trained): a resume must keep them, since the checkpoint holds their tensors."""
    if not model.lora_rank:
        return None
    settings = model_settings(model)
    return {"rank": settings.lora_rank, "alpha": settings.lora_alpha or 2 * settings.lora_rank,
            "targets": list(settings.lora_targets)}


def model_family(model: Model) -> ModelFamily:
    """The family of the run's model."""
    return family_of(model_settings(model))


def model_name(model: Model) -> str:
    """The run's model as logs and checkpoints name it."""
    return model_family(model).display_name(model_settings(model))


def pretrained_source(model: Model) -> str | None:
    """The folder the run's first weights come from; None: initialised from the seed."""
    return model_family(model).pretrained(model_settings(model))


def validate_model(model: Model, topology: Topology, cuda: bool, loss: str,
                   layout: str = "contiguous") -> None:
    """Raise ValueError, with the numbers, unless the model, its weights and the tokenizer fit
    ``topology`` (sizes only), each other and this machine's memory. Pure: reads files, never
    tensor data; the model's sizes are checked before anything is built."""
    from usp.inputs import model_size

    settings, family = model_settings(model), model_family(model)
    check_lora(model, family)
    name = family.display_name(settings)
    size = family.size(settings)
    if size.scans and topology.size("ring") > 1 and layout != "contiguous":
        raise ValueError(
            f"{name} scans the sequence in order in some layers (Mamba-2, gated delta rule), so "
            f"with ring={topology.size('ring')} each ring rank's block must be contiguous: pass "
            f"--layout contiguous (--layout {layout} interleaves the blocks), or --ring 1")
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

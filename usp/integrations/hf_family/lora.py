"""LoRA adapters on a Hugging Face causal LM, injected by PEFT into the meta skeleton before
``usp.parallelize`` (``--lora-rank``, ``--lora-alpha``, ``--lora-targets``).

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` in place by PEFT's LoRA
layer (its weight under ``.base_layer``, the factors under ``.lora_A.default`` and
``.lora_B.default``: ``usp.models.lora``), so the decoder layers stay where ``usp.parallelize``
finds them and FSDP2 shards the factors with the frozen weights of their block. Every base
parameter is frozen (``requires_grad=False``); dropout is 0, so a step is a deterministic
function of the batch. Tensor parallelism and pipeline stages are refused: the transformers TP
plan names the linear layers PEFT has wrapped, and neither is tested with adapters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from usp.models import init
from usp.models.family import ModelSettings
from usp.models.lora import is_adapter
from usp.topology import Topology

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head


def target_modules(settings: ModelSettings) -> str | list[str]:
    """The targets as PEFT's ``LoraConfig.target_modules`` takes them."""
    targets = list(settings.lora_targets)
    return ALL_LINEAR if targets == [ALL_LINEAR] else targets


def lora_config(settings: ModelSettings, base_model: str | None = None):
    """The run's adapters as a ``peft.LoraConfig`` (what an adapter folder's
    ``adapter_config.json`` holds)."""
    from peft import LoraConfig

    alpha = settings.lora_alpha or 2 * settings.lora_rank
    return LoraConfig(r=settings.lora_rank, lora_alpha=alpha,
                      target_modules=target_modules(settings), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def check_targets(settings: ModelSettings, model: nn.Module) -> None:
    """ValueError naming a target that matches no linear layer of ``model`` (a transformers
    model), or a layer it matches that is no ``nn.Linear``. PEFT matches a name to a module
    whose name is it or ends in ``.`` and it."""
    targets = target_modules(settings)
    if targets == ALL_LINEAR:
        return
    if ALL_LINEAR in targets:
        raise ValueError("--lora-targets all-linear stands alone; name layers, or give only "
                         "all-linear")
    for target in targets:
        matched = [(name, module) for name, module in model.named_modules()
                   if name == target or name.endswith("." + target)]
        if not matched:
            raise ValueError(f"--lora-targets {target!r} matches no module of "
                             f"{type(model).__name__}; name linear layers such as q_proj, "
                             "v_proj, or all-linear")
        other = [(name, module) for name, module in matched if type(module) is not nn.Linear]
        if other:
            name, module = other[0]
            raise ValueError(f"--lora-targets {target!r} matches {name} "
                             f"({type(module).__name__}); usp trains adapters of linear "
                             "layers only (nn.Linear)")


def check_topology(topology: Topology) -> None:
    """ValueError for the parallelism adapters are not offered with (tp, pp)."""
    for axis in ("tp", "pp"):
        if topology.size(axis) > 1:
            raise ValueError(f"LoRA adapters with {axis}={topology.size(axis)}: they run with ring x "
                             f"ulysses sequence parallelism and FSDP2 only; use {axis}=1")


def add_adapters(model: nn.Module, settings: ModelSettings) -> None:
    """Inject the settings' LoRA adapters into ``model`` (a transformers model, usually on the
    meta device) in place, and freeze every other parameter."""
    from peft import inject_adapter_in_model

    check_targets(settings, model)
    inject_adapter_in_model(lora_config(settings), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))


@torch.no_grad()
def init_factor(parameter: torch.Tensor, name: str, seed: int) -> None:
    """A LoRA factor's initial values, shard-local like every other parameter
    (``usp.models.init``): ``B = 0``, so the adapted model starts as the base model, and ``A``
    ``normal(0, 1 / sqrt(3 * in_features))``, drawn from ``(seed, name)`` (the variance of
    PEFT's own default, a Kaiming-uniform draw with ``a = sqrt(5)``), the same values on any
    layout and world size."""
    if ".lora_B." in name:
        init.fill_(parameter, 0.0)
    else:  # A [rank, in_features]
        init.normal_(parameter, 1.0 / math.sqrt(3 * parameter.shape[1]), seed, name)

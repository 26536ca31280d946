"""LoRA adapters as PEFT names them, read from any model's parameter names (torch only, no PEFT).

A linear layer ``...q_proj`` that PEFT adapts becomes ``...q_proj.base_layer`` (the frozen
weight ``W``, and its bias) beside ``...q_proj.lora_A.default`` (``A [rank, in]``) and
``...q_proj.lora_B.default`` (``B [out, rank]``); the layer computes ``x W^T + scaling x A^T B^T``
with ``scaling = alpha / rank``. Checkpoints of LoRA runs hold these names, so ``usp export``
reads them here: :func:`merged` folds the adapters into ``W`` under the base model's names, and
:func:`peft_name` spells a tensor as PEFT's ``save_pretrained`` writes an adapter folder.
"""

from __future__ import annotations

import torch

ADAPTER = "default"  # PEFT's name of the one adapter a model gets
BASE = ".base_layer."
FACTORS = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (the LoRA tuner) .model (transformers')


def is_adapter(name: str) -> bool:
    """Whether ``name`` is one of the two LoRA factors of a layer (``A`` or ``B``)."""
    return any(factor in name for factor in FACTORS)


def base_name(name: str) -> str:
    """The name of a frozen base tensor in the model without adapters (``...q_proj.weight``)."""
    return name.replace(BASE, ".")


def layer_of(name: str) -> str:
    """The adapted layer a tensor belongs to (``...q_proj``), or the name itself for a tensor of
    no adapted layer."""
    for marker in (BASE, *FACTORS):
        if marker in name:
            return name.split(marker)[0]
    return name


def peft_name(name: str) -> str:
    """A factor's name as PEFT's ``save_pretrained`` writes it in an adapter folder: ``name``
    (the transformers model's) under PEFT's wrapper, without the adapter's name."""
    for factor in FACTORS:
        name = name.replace(factor, factor.replace(f".{ADAPTER}.", "."))
    return PEFT_PREFIX + name


def units(names: list[str]) -> list[list[str]]:
    """``names`` in groups that must be read together: an adapted layer's weight, bias and both
    factors form one (its merge needs all of them), every other tensor is its own."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        key = layer_of(name) if (BASE in name or is_adapter(name)) else name
        grouped.setdefault(key, []).append(name)
    return list(grouped.values())


@torch.no_grad()
def merged(tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """``tensors`` with every adapted layer's factors folded into its weight, ``W + scaling
    B @ A`` (computed in fp64, returned in ``W``'s dtype), all under the base model's names.
    ValueError for a layer whose weight or one of whose factors is missing."""
    out, layers = {}, {}
    for name, tensor in tensors.items():
        if is_adapter(name):
            layers.setdefault(layer_of(name), {})[name] = tensor
        else:
            out[base_name(name)] = tensor
    for layer, factors in layers.items():
        weight_name = f"{layer}.weight"
        a_name, b_name = (f"{layer}{factor}weight" for factor in FACTORS)
        if a_name not in factors or b_name not in factors or weight_name not in out:
            raise ValueError(f"LoRA layer {layer} lacks its weight or one of its factors "
                             f"(found {sorted(factors)})")
        weight = out[weight_name]
        # [out, rank] @ [rank, in] -> [out, in]
        delta = factors[b_name].double() @ factors[a_name].double()
        out[weight_name] = (weight.double() + scaling * delta).to(weight.dtype)
    return out

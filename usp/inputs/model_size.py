"""The sizes a model config declares: whole positive numbers, and memory that this machine has.

A config is an input like any other: ``num_attention_heads: 0`` makes transformers divide by zero,
``vocab_size: 1e12`` makes a rank try to allocate 256 TB, ``num_hidden_layers: 100000`` keeps a
build busy for minutes before anything fails. Before any rank starts (and before any module is
built, even on the meta device):

- :func:`check_config_values`: every size field of a config (under its own name or the alias
  its config class maps it to) is a positive integer; :func:`check_config` checks the built
  config again (with its defaults) and wants a number wherever its class has a float;
- :func:`parameter_estimate`: the parameters the shapes imply, counted from the config alone
  (embeddings, attention and two MLP matrices per layer, ``usp.models.counts``: a lower bound,
  since gated MLPs have three and other parts are not counted);
- :func:`check_training_memory` / :func:`check_inference_memory`: those parameters times the
  bytes a run keeps of each, against the memory of the device or of this machine, refused with
  the numbers when they cannot fit.
"""

from __future__ import annotations

import os

import torch

from usp.models.counts import parameter_count

# the sizes of a decoder config; None is allowed where transformers derives a default
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim",
               "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "intermediate_size")
# fp32 weights, fp32 gradients and AdamW's two fp32 moments (--dtype bf16 keeps fp32 weights)
TRAINING_BYTES_PER_PARAMETER = 16
GIB = 2**30


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config_values(values: dict, config_class, path) -> None:
    """Refuse a size of the raw config ``values`` that is not a positive integer, before the
    config class computes anything from it (``hidden_size // num_attention_heads``)."""
    aliases = getattr(config_class, "attribute_map", {}) or {}
    for field in SIZE_FIELDS:
        key = aliases.get(field, field)
        if key not in values:
            continue
        value = values[key]
        if value is None and field in OPTIONAL_SIZES:
            continue
        if not _is_positive_int(value):
            raise ValueError(f"{path}: {key}={value!r}; a size of a model is a positive whole "
                             "number")


def check_config(config, path) -> None:
    """The same for a built config, whose defaults fill what the file left out; and a number
    wherever the config class's default is a float (``rope_parameters.rope_theta``, epsilons)."""
    values = {field: getattr(config, field, None) for field in SIZE_FIELDS}
    check_config_values({k: v for k, v in values.items() if v is not None or k in OPTIONAL_SIZES},
                        None, path)
    try:
        defaults = type(config)().to_dict()
    except Exception:  # a class without a default instance: transformers' own checks remain
        return
    _check_numbers(config.to_dict(), defaults, path, "")


def _check_numbers(values: dict, defaults: dict, path, prefix: str) -> None:
    for key, default in defaults.items():
        value = values.get(key)
        if isinstance(default, dict) and isinstance(value, dict):
            _check_numbers(value, default, path, f"{prefix}{key}.")
        elif isinstance(default, float) and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: {prefix}{key}={value!r}; it is a number")


def parameter_estimate(config) -> int:
    """A lower bound of the parameters of a transformers decoder config (two MLP matrices)."""
    heads = config.num_attention_heads
    return parameter_count(
        config.vocab_size, config.hidden_size, config.num_hidden_layers, heads,
        getattr(config, "num_key_value_heads", None) or heads,
        getattr(config, "head_dim", None) or config.hidden_size // heads,
        getattr(config, "intermediate_size", None) or 0, 2,
        bool(getattr(config, "tie_word_embeddings", False)),
    )


def host_memory_bytes() -> int:
    """The physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _local_ranks(world_size: int) -> int:
    """Ranks sharing this machine: torchrun's LOCAL_WORLD_SIZE, else the whole world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def check_training_memory(name: str, parameters: int, world_size: int, cuda: bool) -> None:
    """Refuse a model whose training state cannot fit: 16 bytes per parameter, sharded over the
    ranks, against each device's memory (CUDA) or this machine's (CPU ranks share it)."""
    total = parameters * TRAINING_BYTES_PER_PARAMETER
    per_rank = total / world_size
    state = (f"{name} has at least {parameters:,} parameters; training keeps "
             f"{TRAINING_BYTES_PER_PARAMETER} bytes of each (fp32 weights, gradients and two AdamW "
             f"moments): {total / GIB:,.1f} GiB in all, {per_rank / GIB:,.1f} GiB on each of "
             f"{world_size} rank(s), before any activation")
    if cuda:
        device = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if per_rank > device:
            raise ValueError(f"{state}; a GPU here has {device / GIB:,.1f} GiB. Use a smaller "
                             "model or more ranks")
        return
    local = _local_ranks(world_size)
    needed, available = per_rank * local, host_memory_bytes()
    if needed > available:
        raise ValueError(f"{state}; the {local} rank(s) on this machine need {needed / GIB:,.1f} "
                         f"GiB and it has {available / GIB:,.1f} GiB. Use a smaller model or "
                         "more machines")


def check_inference_memory(name: str, parameters: int, bytes_per_parameter: int,
                           ranks: int) -> None:
    """Refuse generation whose ranks (each holding the whole model) cannot fit this machine."""
    needed, available = parameters * bytes_per_parameter * ranks, host_memory_bytes()
    if needed > available:
        raise ValueError(
            f"{name} has {parameters:,} parameters, {bytes_per_parameter} bytes each in this "
            f"dtype, and each of the {ranks} rank(s) holds the whole model: "
            f"{needed / GIB:,.1f} GiB, and this machine has {available / GIB:,.1f} GiB. Use fewer "
            "ranks, a smaller dtype or a smaller model"
        )

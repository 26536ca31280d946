"""A Llama against a topology: the checks of its preset (before any rank starts) and of a built
model (``usp.parallelize``), and the swap of every layer's attention for ``usp_attention``; the
family's ``ModelPlan`` (``usp.models.llama.family``) names these, the tensor-parallel plan of
``usp.models.llama.tp`` and the stage cut of ``usp.models.llama.stages``."""

from __future__ import annotations

from functools import partial

from torch import nn

from usp.attention import usp_attention
from usp.attention.heads import head_plan
from usp.models.family import ModelSettings, check_vocabulary
from usp.models.llama.presets import LlamaConfig, get_config
from usp.topology import Topology


def check_parallel_config(config: LlamaConfig, topology: Topology) -> str | None:
    """Raise ValueError, naming the numbers, unless pp, tp and ulysses can split the model.

    Returns a note when Ulysses runs on padded heads (exact, but they cost their share of the
    work); ``usp.parallelize`` logs it once, on the first rank, so validating again (before
    launch, on every rank) repeats nothing."""
    tp, ulysses, pp = topology.size("tp"), topology.size("ulysses"), topology.size("pp")
    if config.n_layers < pp:
        raise ValueError(f"n_layers={config.n_layers} < pp={pp}: every pipeline stage needs a layer")
    if config.tie_embeddings and pp > 1:
        raise ValueError(
            "tie_embeddings with pp > 1: the embedding (first stage) and the output projection "
            "(last stage) would live on different ranks; untie them or use pp=1"
        )
    for name, value in (
        ("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
        ("ffn_dim", config.ffn_dim), ("vocab_size", config.vocab_size),
    ):
        if value % tp != 0:
            raise ValueError(
                f"{name}={value} is not divisible by tp={tp}: tensor parallelism splits it evenly "
                f"over the tp ranks; choose tp dividing {value}"
            )
    # heads split over tp first, then over ulysses: an uneven ulysses split runs on padded
    # heads (exact; usp.attention.heads.head_plan), which costs their share of the work
    plan = head_plan(config.n_heads // tp, config.n_kv_heads // tp, ulysses)
    if not plan.padded:
        return None
    return (f"{config.n_heads // tp} query / {config.n_kv_heads // tp} kv heads per tp rank over "
            f"ulysses={ulysses}: {plan.describe()} (padding heads cost their share of compute)")


def validate(settings: ModelSettings, topology: Topology, token_ids: int) -> None:
    """The preset's heads, layers and vocabulary against the topology and the data's ids."""
    config = get_config(settings.model)
    check_parallel_config(config, topology)
    check_vocabulary("LlamaConfig", config.vocab_size, token_ids)


def check(model: nn.Module, topology: Topology) -> str | None:
    """:func:`check_parallel_config` of a built model (the plan's check)."""
    return check_parallel_config(model.config, topology)


def use_usp_attention(model: nn.Module, topology: Topology, layout: str, kernel: str,
                      ring_layout: str | None = None) -> None:
    """Every layer this rank holds attends with ``usp_attention`` over ``topology``."""
    for block in model.layers.values():
        block.attention.attention_fn = partial(
            usp_attention, topology=topology, causal=True, layout=layout, kernel=kernel,
            ring_layout=ring_layout,
        )

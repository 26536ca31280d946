"""What ``usp.parallelize`` needs of a Hugging Face causal LM beyond its stage cut: the checks
against a topology, the ``"usp"`` attention on the topology (a new :class:`USPContext`), and a
decoder layer's MLP. Tensor parallelism is ``usp.integrations.hf_family.tp`` (checked here); the
losses that need the output projection split from the model are not offered (it computes its
own logits)."""

from __future__ import annotations

from torch import nn

from usp.integrations.hf_family.stages import check_stages
from usp.integrations.hf_family.tp import check_tensor_parallel
from usp.integrations.hf_mixers import unsplit_mixers
from usp.integrations.transformers import USPContext, check_config, check_sequence_mixers
from usp.integrations.hf_family.lora import check_topology
from usp.models.lora import is_adapter
from usp.topology import Topology


def check(model: nn.Module, topology: Topology) -> None:
    """ValueError, naming the layer or the numbers, for what ``topology`` cannot split."""
    check_sequence_mixers(unsplit_mixers(model.model), topology)
    check_config(model.config, topology, scans=True)  # use_usp_attention prepares it
    if getattr(model.config, "output_router_logits", False) and topology.size("pp") > 1:
        raise ValueError(
            f"{type(model.config).__name__}.output_router_logits=True with pp="
            f"{topology.size('pp')}: the router load-balancing loss sums over every layer, and "
            "each stage holds some of them; use pp=1, or output_router_logits=False"
        )
    check_stages(model.config, topology)
    if any(is_adapter(name) for name, _ in model.named_parameters()):
        check_topology(topology)
    check_tensor_parallel(model.model, topology)


def use_usp_attention(model: nn.Module, topology: Topology, layout: str, kernel: str,
                      ring_layout: str | None = None) -> None:
    """Run the model's attention as ``"usp"`` over ``topology`` (its context for every forward)."""
    model.context = USPContext(topology, layout, kernel, ring_layout=ring_layout)
    model.context.prepare(model.model)


def mlp(layer: nn.Module) -> nn.Module:
    """A decoder layer's ``.mlp``; ValueError for an architecture without one."""
    if not hasattr(layer, "mlp"):
        raise ValueError(
            f"selective activation checkpointing recomputes each decoder layer's .mlp, which "
            f"{type(layer).__name__} lacks; use activation_checkpointing='full'"
        )
    return layer.mlp

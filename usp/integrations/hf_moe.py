"""The router load-balancing loss of transformers' mixture-of-experts models, exact when the
sequence is split.

transformers' ``load_balancing_loss_func`` (Switch Transformer, eqs. 4-6) is, over the rows of
every layer's router logits (tokens x layers, padding left out),

    aux = E * sum_e (T_e / N) * (P_e / N)

with ``T_e`` the number of top-k picks of expert ``e``, ``P_e`` the sum of its softmax
probability and ``N`` the number of rows. It is a product of two means, so each rank's own value
over its shard of the sequence is not a share of the whole sequence's, and averaging them after
the fact is wrong. Here the statistics are reduced instead: every rank sums ``T``, ``P`` and
``N`` over its rows, one all-reduce over the ranks that hold different tokens
(dp x ring x ulysses) gives the global ones, and the value is the one-process value. Only ``P``
has a gradient (the top-k picks are piecewise constant): this rank's gradient is that of
``E * sum_e T_e * P_e(this rank's rows) / N**2``, whose sum over the ranks is the whole
gradient, as for the cross-entropy (``usp.loss``).

The models whose transformers implementation is that function (the same code in each modelling
file of transformers 5.x) are listed in :data:`SWITCH_ROUTER_LOSS`; another model that asks for
its router loss while the sequence is split is refused.
"""

from __future__ import annotations

import torch

from usp.layout import sequence_positions
from usp.mask import NOT_A_TOKEN
from usp.topology import Topology

# model types whose load_balancing_loss_func is the one above (transformers 5.4-5.23); Mixtral,
# Qwen3-MoE, GPT-OSS and the hybrids Granite 4, Qwen3.5-MoE, Qwen3-Next and Jamba are tested
# (tests/test_moe.py)
SWITCH_ROUTER_LOSS = (
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next",
    "gpt_oss", "olmoe", "phimoe", "granitemoe", "granitemoeshared", "granitemoehybrid", "jamba",
    "flex_olmo", "ernie4_5_moe", "minimax", "minimax_m2",
)


def router_settings(model) -> tuple[int, int, float]:
    """``(experts, experts per token, loss coefficient)`` as the ``ForCausalLM`` model adds the
    loss (``model.num_experts``, ``num_experts_per_tok``, ``router_aux_loss_coef``)."""
    names = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")
    missing = [name for name in names if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} returns router logits but has no {missing}: "
                         "usp cannot tell how its router loss is made")
    return model.num_experts, model.num_experts_per_tok, float(model.router_aux_loss_coef)


def check_router_loss_model(config) -> None:
    """ValueError for a model that asks for its router loss (``output_router_logits=True``)
    while usp cannot compute it exactly over a split sequence."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "output_router_logits", False) and model_type not in SWITCH_ROUTER_LOSS:
        raise ValueError(
            f"{type(config).__name__}.output_router_logits=True: usp reduces the router "
            f"load-balancing loss over the ranks for {', '.join(SWITCH_ROUTER_LOSS)}, and "
            f"{model_type!r} makes its loss otherwise; set output_router_logits=False (the "
            "experts themselves run exactly)"
        )


def token_rows(documents: torch.Tensor | None, attention_mask: torch.Tensor | None,
               topology: Topology, layout: str, like: torch.Tensor) -> torch.Tensor | None:
    """``[B * S_local]`` 1.0 for each row of this rank's router logits that is a token, 0.0 for
    padding: the ``NOT_A_TOKEN`` slots of ``usp_documents`` (global ``[B, S]``, from
    ``USPContext.shard``) and the slots the layout pads the sequence with, and the zeros of a
    2-D ``attention_mask`` (this rank's shard); None: every row is a token."""
    rows = None
    if documents is not None:
        length = documents.shape[-1]
        positions = sequence_positions(length, topology, layout)
        rows = (documents[:, positions.clamp(max=length - 1)] != NOT_A_TOKEN) & (positions < length)
    if attention_mask is not None and attention_mask.dim() == 2:
        given = attention_mask.bool()
        rows = given if rows is None else rows & given
    return None if rows is None else rows.reshape(-1).to(like.device, like.dtype)


def global_router_loss(router_logits, experts: int, top_k: int, topology: Topology,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balancing loss of the whole batch from this rank's ``router_logits`` (one
    ``[B * S_local, experts]`` tensor per layer) and ``rows`` (:func:`token_rows`): value the
    one-process value, gradient this rank's share (module docstring). Sums in fp64."""
    if not router_logits:
        raise ValueError("no router logits: pass output_router_logits=True to the model")
    dtype, device, length = torch.float64, router_logits[0].device, router_logits[0].shape[0]
    # every layer routes the same rows: this rank's token slots
    row = torch.ones(length, dtype=dtype, device=device) if rows is None else rows.to(dtype)
    if any(layer.shape[0] != row.shape[0] for layer in router_logits):
        raise ValueError(f"router logits of {[layer.shape[0] for layer in router_logits]} rows, "
                         f"but the batch holds {row.shape[0]} token slots on this rank")
    picked = row.repeat_interleave(top_k)
    picks = torch.zeros(experts, dtype=dtype, device=device)
    probability = torch.zeros_like(picks)
    for layer in router_logits:
        weights = torch.softmax(layer.to(dtype), dim=-1)
        chosen = torch.topk(weights, top_k, dim=-1).indices
        picks = picks.scatter_add(0, chosen.reshape(-1), picked)
        probability = probability + (weights * row[:, None]).sum(dim=0)
    count = (row.sum() * len(router_logits)).reshape(1)
    totals = topology.sum_over_data(torch.cat([picks, probability.detach(), count]))
    picks, global_probability, global_count = totals[:experts], totals[experts:-1], totals[-1]
    if global_count == 0:
        raise ValueError("every token slot of the batch is padding: no router loss")
    fractions = picks / global_count
    value = experts * (fractions * global_probability).sum() / global_count
    share = experts * (fractions * probability).sum() / global_count
    # the value of the whole batch, the gradient of this rank's rows
    return share + (value - share).detach()

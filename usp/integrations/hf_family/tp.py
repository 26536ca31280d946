"""Tensor parallelism for Hugging Face causal LMs, read off the config's own ``base_model_tp_plan``.

transformers writes down, for each architecture, how each module of the base model splits over
tp ranks (``"layers.*.self_attn.q_proj": "colwise"``, ...). usp reads those strings and applies
torch's DTensor styles itself; transformers' distributed loading is not used. It is plain
(Megatron) tensor parallelism without sequence parallelism: between the column-wise and the
row-wise projections of a block each tp rank holds its slice of the features, everywhere else
(the residual stream, the norms, the embedding) every tp rank holds the same whole tensors.

The strings usp runs (:data:`STYLES`):

- ``"colwise"``: weight and bias split by output features; the output stays this rank's slice.
  For q/k/v that is ``H / tp`` query and ``H_kv / tp`` kv heads: the attention reshapes
  ``view(B, S, -1, head_dim)`` from the local width, and usp's attention reads its head counts
  off its inputs, so the heads are split over tp first and then, inside the attention, over
  ulysses (as for usp's Llama).
- ``"rowwise"``: weight split by input features, the input is this rank's slice, the partial
  outputs are summed over tp; a bias is added once.
- ``"colwise_gather_output"`` (``"colwise_rep"``): column-wise, the output gathered whole.
- ``"rowwise_split_input"`` (``"rowwise_rep"``): row-wise on a whole input (each rank its slice).
- ``"replicated_with_grad_allreduce"``: whole parameters acting on a tp rank's slice along the
  heads dim (Qwen3's per-head ``q_norm``/``k_norm``): the gradient is summed over tp.
- ``"replicate"``: whole parameters on whole inputs.

Every other module that holds parameters (the embedding, the decoder norms) keeps them whole on
every tp rank (:class:`ReplicatedParameters`). The output projection is column-wise over the
vocabulary, gathered to full logits (the family offers only the ``"full"`` loss); one tied to
the embedding stays whole, shared with it. A whole embedding is exact for every embedding
module transformers has (scaled, with a ``padding_idx``).

What cannot be split exactly is refused, naming the numbers or the module, before any rank
computes: no plan, a plan string usp does not run, heads or split widths not divisible by tp, a
module holding parameters beside split projections that the plan does not name, and tp with
pipeline stages (stage boundaries carry ``S / tp`` tokens, which needs sequence parallelism).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel, parallelize_module,
)

from usp.topology import Topology


class ReplicatedParameters(ParallelStyle):
    """A module's own parameters whole on every tp rank (``Replicate`` DTensors), run on its
    inputs as they are; its outputs leave as plain tensors.

    Right for a module whose inputs are the same on every tp rank (between blocks, under plain
    tensor parallelism): each rank then computes the whole gradient itself."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _replicate_own_parameters,
                                 input_fn=_inputs_replicated, output_fn=_outputs_local)


def _replicate_own_parameters(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for key, parameter in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(
            distribute_tensor(parameter, mesh, [Replicate()]), parameter.requires_grad))


def _inputs_replicated(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                 if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
                 for x in inputs)


def _outputs_local(module: nn.Module, outputs, mesh: DeviceMesh):
    if isinstance(outputs, tuple):
        return tuple(x.to_local() if isinstance(x, DTensor) else x for x in outputs)
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


# transformers' plan strings -> (a DTensor style, which features of an nn.Linear it splits:
# "out"put, "in"put, or None for whole parameters)
STYLES: dict[str, tuple[Callable[[], ParallelStyle], str | None]] = {
    "colwise": (ColwiseParallel, "out"),
    "rowwise": (RowwiseParallel, "in"),
    "colwise_gather_output": (lambda: ColwiseParallel(output_layouts=Replicate()), "out"),
    "colwise_rep": (lambda: ColwiseParallel(output_layouts=Replicate()), "out"),
    "rowwise_split_input": (lambda: RowwiseParallel(input_layouts=Replicate()), "in"),
    "rowwise_rep": (lambda: RowwiseParallel(input_layouts=Replicate()), "in"),
    # torch's SequenceParallel is "whole parameters, input split along one dim": here the heads
    # dim of [B, S, H / tp, D]; the parameter's gradient comes out summed over tp
    "replicated_with_grad_allreduce": (
        lambda: SequenceParallel(sequence_dim=-2, use_local_output=True), None),
    "replicate": (ReplicatedParameters, None),
}
# the styles whose output (colwise) or input (rowwise) is a tp rank's slice beside its siblings
LOCAL_SLICES = ("colwise", "rowwise")


def _pattern(name: str) -> str:
    """A module name as transformers' plans write it: layer numbers become ``*``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def resolve_plan(causal_lm: nn.Module, tp: int) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, plan string)`` for every module of ``causal_lm`` (a transformers causal
    LM, perhaps on meta) that holds parameters, names relative to its base model, with
    ``"replicate"`` for what the plan leaves whole and ``"lm_head"`` for the output projection
    (``"colwise_gather_output"``, or ``"replicate"`` when tied to the embedding).

    ValueError, naming the module or the numbers, for anything that would not split exactly."""
    config = causal_lm.config
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(
            f"tp={tp}: {type(config).__name__} has no base_model_tp_plan, so transformers does "
            "not say how to split its modules over tensor-parallel ranks; use tp=1"
        )
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, key, None)
        if heads and heads % tp:
            raise ValueError(
                f"{key}={heads} is not divisible by tp={tp}: each tp rank computes whole heads "
                f"of the column-wise q/k/v projections; choose tp dividing {heads}"
            )
    base = causal_lm.base_model
    modules = dict(base.named_modules())
    parameters = {_pattern(name) for name, _ in base.named_parameters()}
    named = {name: plan[_pattern(name)] for name in modules if _pattern(name) in plan}
    for key, style in plan.items():
        if key in parameters:
            raise ValueError(f"base_model_tp_plan splits the parameter {key!r} ({style!r}) "
                             "itself; usp splits whole modules only, so it cannot run this plan")
    resolved = []
    for name, module in modules.items():
        style = named.get(name)
        if style is None:
            if _own_parameters(module):
                if any(_own_parameters(child) for child in module.modules() if child is not module):
                    raise ValueError(
                        f"{name} ({type(module).__name__}) holds parameters of its own beside "
                        "submodules with parameters, and base_model_tp_plan does not say how to "
                        "split it; usp keeps only leaf modules whole, so use tp=1 for this model")
                resolved.append((name, module, "replicate"))
            continue
        if style not in STYLES:
            raise ValueError(
                f"base_model_tp_plan gives {name} the style {style!r}, which usp does not run "
                f"(it runs {', '.join(sorted(STYLES))}); use tp=1 for this model"
            )
        splits = STYLES[style][1]
        if splits is not None:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"base_model_tp_plan splits {name} ({style!r}), a "
                                 f"{type(module).__name__}; usp splits nn.Linear layers only")
            width = module.out_features if splits == "out" else module.in_features
            if width % tp:
                raise ValueError(f"{name}: {style!r} splits its {width} {splits}put features "
                                 f"over tp={tp}, which does not divide them; choose tp dividing "
                                 f"{width}")
        resolved.append((name, module, style))
    _check_neighbours(resolved, named)
    return resolved + [_output_projection(causal_lm, tp)]


def _check_neighbours(resolved: list, named: dict[str, str]) -> None:
    """A module the plan does not name, holding parameters, beside a projection whose output or
    input is a tp rank's slice may see that slice: kept whole, its gradient would miss the other
    ranks' part. Refused rather than guessed. And a ``"replicated_with_grad_allreduce"`` module
    must sit beside a ``"colwise"`` projection, whose slice it sees: on a whole input, summing
    its gradient over tp would count it tp times."""
    parents = {style: {name.rpartition(".")[0] for name, given in named.items() if given == style}
               for style in LOCAL_SLICES}
    for name, module, style in resolved:
        parent = name.rpartition(".")[0]
        if style == "replicated_with_grad_allreduce" and parent not in parents["colwise"]:
            raise ValueError(
                f"base_model_tp_plan gives {name} {style!r}, but no projection beside it is "
                "'colwise', so it would not see a tp rank's slice; usp cannot run this plan")
        if name not in named and parent in parents["colwise"] | parents["rowwise"]:
            raise ValueError(
                f"{name} ({type(module).__name__}) holds parameters beside the projections that "
                "base_model_tp_plan splits, and the plan does not say how to split it; usp "
                "cannot tell whether it sees a tp rank's slice, so it runs this model with tp=1 "
                "only")


def _output_projection(causal_lm: nn.Module, tp: int) -> tuple[str, nn.Module, str]:
    head = causal_lm.get_output_embeddings()
    if head.weight is causal_lm.get_input_embeddings().weight:
        return "lm_head", head, "replicate"  # tied: kept whole with the embedding
    if head.out_features % tp:
        raise ValueError(
            f"vocab_size={head.out_features} is not divisible by tp={tp}: the output projection "
            f"splits the vocabulary over the tp ranks; choose tp dividing {head.out_features}"
        )
    return "lm_head", head, "colwise_gather_output"


def check_tensor_parallel(causal_lm: nn.Module, topology: Topology) -> None:
    """ValueError, naming the numbers or the module, unless ``causal_lm`` (a transformers causal
    LM, a skeleton on meta will do) splits exactly over ``topology``'s tp ranks."""
    tp, pp = topology.size("tp"), topology.size("pp")
    if tp == 1:
        return
    if pp > 1:
        raise ValueError(
            f"tp={tp} with pp={pp}: pipeline stages exchange S / tp tokens, which needs sequence "
            "parallelism inside tensor parallelism; Hugging Face models run plain tensor "
            "parallelism, so use pp=1 or tp=1"
        )
    resolve_plan(causal_lm, tp)


def apply_hf_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh,
                             vocab_parallel: bool = False) -> None:
    """Split ``model`` (an ``HFCausalLM``) over ``tp_mesh`` by its config's plan, in place."""
    if vocab_parallel:
        raise ValueError("Hugging Face models compute their own full logits; loss='vocab_parallel' "
                         "is not offered for them (use loss='full')")
    causal_lm = model.model
    embedding, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    tied = head.weight is embedding.weight
    for _, module, style in resolve_plan(causal_lm, tp_mesh.size()):
        parallelize_module(module, tp_mesh, STYLES[style][0]())
    if tied:  # each module got its own replicated copy: share one again
        head.weight = embedding.weight

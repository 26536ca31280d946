"""``attn_implementation="usp"``: Hugging Face transformers models with sequence parallelism.

Importing this module registers ``"usp"`` with transformers' two registries: the mask function
(:func:`usp.integrations.hf_masks.usp_mask`, which builds no dense mask, only a
:class:`MaskRequest`) and the attention function (:func:`usp_attention_forward`, which checks the
request and the ``position_ids`` and runs :func:`usp.usp_attention` on the local shards).

The topology and layout travel in a :class:`USPContext` passed to the model's forward,
``model(**inputs, usp_context=context, use_cache=False)``: transformers hands extra forward
kwargs to the attention function. Nothing global is kept beyond the two registry entries, so
models on different topologies can live side by side.

Checks that depend on a rank's data (padding, positions) are agreed over all ranks with one tiny
all-reduce per forward, so a refusal raises the same ValueError on every rank instead of leaving
the others waiting in a collective.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from usp.attention import usp_attention
from usp.attention.ulysses import head_plan
from usp.comm import agree
from usp.data import shard_batch
from usp.integrations.hf_masks import ATTENTION_NAME, MaskRequest, usp_mask, window_refusal
from usp.layout import check_layout, sequence_positions
from usp.loss import DATA_AXES, data_parallel_size, global_mean_cross_entropy
from usp.topology import Topology

# RoPE variants that rescale from the largest position they see: each rank sees another largest
# position, so the ranks would rotate the same token differently
SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")
# forward kwargs that reach the attention function and change nothing in it
IGNORED_OPTIONS = ("use_cache",)


class USPContext:
    """The topology, layout and kernel of a sequence-parallel forward; pass it as ``usp_context``.

    Build it on every rank at the same point (with several ranks it creates the flattened
    dp × ring × ulysses process group that agreement, loss and FSDP2 share).
    """

    def __init__(self, topology: Topology, layout: str = "zigzag", kernel: str = "auto") -> None:
        check_layout(layout)
        if topology.size("tp") != 1:
            raise ValueError(
                f"tp={topology.size('tp')}: tensor parallelism is not supported for Hugging Face "
                "models; use tp=1 and put the ranks on dp, ring and ulysses"
            )
        self.topology, self.layout, self.kernel = topology, layout, kernel
        self._group = None
        if data_parallel_size(topology) > 1:
            self._group = topology.flat_mesh(*DATA_AXES).get_group()

    def __repr__(self) -> str:
        return f"USPContext({self.topology}, layout={self.layout!r}, kernel={self.kernel!r})"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Check ``model``'s config and switch it to ``attn_implementation="usp"`` (in place)."""
        check_config(model.config, self.topology)
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        return model

    def shard(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """This rank's ``input_ids``, ``position_ids`` and ``labels`` of a global batch ``[B, S]``.

        ``labels`` follow transformers' convention (defaults to ``input_ids``; ``-100`` is
        ignored; the model would shift them). They are shifted **globally** before sharding:
        ``labels[b, i]`` is the label of the token after position ``i``, ``-100`` after the last
        one, so pass them to :meth:`loss`, not to the model. Rows are split over dp.
        """
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} must both be "
                "[B, S]"
            )
        # usp.data.shard_batch shards [B, S + 1] windows whose labels are the next tokens:
        # append one column, and the window of the labels shifted by one is the shifted labels
        pad = torch.full_like(input_ids[:, :1], -100)
        inputs = shard_batch(torch.cat([input_ids, pad], dim=1), self.topology, self.layout)
        targets = shard_batch(torch.cat([labels, pad], dim=1), self.topology, self.layout)
        return {
            "input_ids": inputs["input_ids"],
            "position_ids": inputs["position_ids"],
            "labels": targets["labels"],
        }

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The exact mean cross-entropy over all ranks' labels (from :meth:`shard`).

        Its gradient is this rank's share: sum gradients over dp × ring × ulysses.
        """
        return global_mean_cross_entropy(logits, labels, self.topology)

    def agree(self, refusal: str | None) -> None:
        """Raise the refusal of any rank as the same ValueError on every rank (one all-gather)."""
        agree(self._group, {}, refusal)


def check_config(config, topology: Topology) -> None:
    """Raise ValueError for model settings that usp cannot run exactly on ``topology``.

    :meth:`USPContext.prepare` calls it to fail before the first forward; the mask and attention
    functions refuse the same settings (and anything else) at run time in any case.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_plan(heads, kv_heads, topology.size("ulysses"))
    check_rope(config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window is not None and (not layer_types or "sliding_attention" in layer_types):
        raise ValueError(window_refusal(config, window))


def check_rope(config) -> None:
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope in SEQUENCE_DEPENDENT_ROPE:
        raise ValueError(
            f"{type(config).__name__} uses rope_type={rope!r}, which rescales from the largest "
            "position each rank sees, so the ranks would disagree; use a static RoPE (default, "
            "linear, yarn, llama3)"
        )


# ----------------------------------------------------------------------------- attention function
def usp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    usp_context: USPContext | None = None,
    **options,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook for ``"usp"``.

    query [B, Hq, S_RU, D], key/value [B, Hkv, S_RU, D] -> ([B, S_RU, Hq, D], None).
    """
    config = getattr(module, "config", None)
    if not isinstance(usp_context, USPContext):
        raise ValueError(
            f'attn_implementation="{ATTENTION_NAME}" needs the forward kwarg usp_context='
            "USPContext(topology, layout); got " + repr(usp_context)
        )
    if sliding_window is not None:
        raise ValueError(window_refusal(config, sliding_window))
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} is not supported by usp; set the config's "
            "attention_dropout=0.0 or call model.eval()"
        )
    unknown = {k: v for k, v in options.items() if k not in IGNORED_OPTIONS and v is not None}
    if unknown:
        raise ValueError(
            f"usp attention does not support the options {sorted(unknown)} that "
            f"{type(module).__name__} passes; use another attn_implementation for this model"
        )
    request = attention_mask if isinstance(attention_mask, MaskRequest) else None
    if config is not None:
        check_rope(config)
    if request is None or not request.agreed:
        refusal = _local_refusal(attention_mask, query, key, is_causal, position_ids, usp_context)
        usp_context.agree(refusal)
        request.agreed = True  # agree() raised unless the mask is a MaskRequest
    out = usp_attention(
        # [B, H, S_RU, D] -> [B, S_RU, H, D]
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), usp_context.topology,
        causal=request.causal, layout=usp_context.layout, softmax_scale=scaling,
        kernel=usp_context.kernel,
    )
    return out, None


def _local_refusal(attention_mask, query, key, is_causal, position_ids, context) -> str | None:
    """Why this rank cannot run the attention exactly, or None."""
    if not isinstance(attention_mask, MaskRequest):
        return (
            f"the attention received a {type(attention_mask).__name__} mask that transformers did "
            f'not build through the "{ATTENTION_NAME}" mask function (a custom 4-D mask or '
            "BlockMask); usp supports causal and unmasked attention only"
        )
    if attention_mask.refusal is not None:
        return attention_mask.refusal
    if is_causal is not None and is_causal != attention_mask.causal:
        return f"the layer asks is_causal={is_causal}, its mask causal={attention_mask.causal}"
    if key.shape[2] != query.shape[2]:
        return f"{query.shape[2]} queries attend {key.shape[2]} keys; pass use_cache=False"
    topology, layout = context.topology, context.layout
    local_len = query.shape[2]
    seq_len = local_len * topology.sequence_size
    if position_ids is None:
        return (
            "the attention layers received no position_ids; pass the model position_ids="
            "USPContext.shard(...)['position_ids'] (usp checks them against the layout)"
        )
    expected = sequence_positions(seq_len, topology, layout).to(query.device)
    if position_ids.shape[-1] != local_len or not bool((position_ids == expected).all()):
        return (
            f"position_ids must be the global positions of this rank's {local_len} of {seq_len} "
            f"tokens under layout={layout!r} over ring={topology.ring_size} x ulysses="
            f"{topology.ulysses_size}: pass USPContext.shard(...)['position_ids'] "
            "(= usp.sequence_positions); positions that restart (packed documents) need a "
            "document mask, which usp does not support yet"
        )
    return None


def register() -> None:
    """Register ``"usp"`` with transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, usp_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, usp_mask)


register()

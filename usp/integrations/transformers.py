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

import dataclasses

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils.generic import TransformersKwargs

from usp.attention import usp_attention
from usp.attention.heads import head_plan
from usp.comm import agree
from usp.batch import IGNORE_INDEX, documents_from_positions, positions_in_documents, shard_batch
from usp.integrations.hf_masks import ATTENTION_NAME, MaskRequest, usp_mask
from usp.integrations.hf_moe import (
    check_router_loss_model, global_router_loss, router_settings, token_rows,
)
from usp.integrations.hf_mixers import (
    SplitRefusal, check_sequence_mixers, config_sequence_mixers, unsplit_mixers,
)
from usp.integrations.hf_scan import split_mixers
from usp.layout import check_layout, sequence_positions, unshard_sequence
from usp.mask import NOT_A_TOKEN, AttentionMask
from usp.loss import global_mean_cross_entropy
from usp.topology import DATA_AXES, Topology

# RoPE variants that rescale from the largest position they see: each rank sees another largest
# position, so the ranks would rotate the same token differently
SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")
# forward kwargs that reach the attention function and change nothing in it (transformers'
# packing kwargs describe the same documents as usp_documents or position_ids)
IGNORED_OPTIONS = ("use_cache", "cu_seq_lens_k", "max_length_q", "max_length_k",
                   "output_router_logits")


class USPContext:
    """The topology, layout and kernel of a sequence-parallel forward; pass it as ``usp_context``.

    Build it on every rank at the same point (with several ranks it creates the flattened
    dp × ring × ulysses process group that agreement, loss and FSDP2 share). The tp ranks of a
    topology hold the same tokens: a model split over them (``usp.parallelize``:
    ``usp.integrations.hf_family.tp``) attends with each tp rank's heads.
    """

    # each rank's hidden states hold its shard of the sequence between the layers, so a scan
    # layer runs split (usp.integrations.hf_scan); a generation's context holds them whole
    shards_hidden_states = True

    def __init__(self, topology: Topology, layout: str = "zigzag", kernel: str = "auto", *,
                 ring_layout: str | None = None) -> None:
        check_layout(layout)
        if ring_layout is not None:
            check_layout(ring_layout)
        self.topology, self.layout, self.kernel = topology, layout, kernel
        # the layout ring attention runs on (usp_attention's ring_layout); None: the layout's
        self.ring_layout = ring_layout
        # set by a prepared model's forward pre-hook for that forward (ForwardChecks)
        self.forward_checks: ForwardChecks | None = None
        self._group = None
        if topology.data_size > 1:
            self._group = topology.flat_mesh(*DATA_AXES).get_group()

    def __repr__(self) -> str:
        ring = f", ring_layout={self.ring_layout!r}" if self.ring_layout else ""
        return (f"USPContext({self.topology}, layout={self.layout!r}, kernel={self.kernel!r}"
                f"{ring})")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Check ``model`` and switch it to ``attn_implementation="usp"`` (in place).

        The scan layers of the hybrids usp splits (Bamba's Mamba-2, Qwen3-Next's gated delta
        rule: :mod:`usp.integrations.hf_scan`) get a forward that runs them split over the
        sequence ranks. Refuses (ValueError, the same on every rank, before any forward) a model
        with another layer that mixes tokens other than softmax attention (Mamba-1, another
        Mamba-2 mixer, a convolution over tokens ...:
        :mod:`usp.integrations.hf_mixers`) when this context splits the sequence. Such a model
        prepared on ring = ulysses = 1 keeps a check on its forward: called with a
        ``usp_context`` that splits the sequence, it raises before any layer runs.
        """
        mixers = unsplit_mixers(model)
        check_sequence_mixers(mixers, self.topology)
        check_config(model.config, self.topology, scans=True)
        split_mixers(model)
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        for name in ("_usp_sequence_mixer_check", "_usp_forward_checks", "_usp_router_loss"):
            previous = getattr(model, name, None)
            if previous is not None:
                previous.remove()
        if mixers:
            model._usp_sequence_mixer_check = model.register_forward_pre_hook(
                SplitRefusal(mixers), with_kwargs=True)
        model._usp_forward_checks = model.register_forward_pre_hook(ForwardChecks.start,
                                                                    with_kwargs=True)
        model._usp_router_loss = model.register_forward_hook(ForwardChecks.finish,
                                                             with_kwargs=True)
        return model

    def shard(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
        split_rows: bool = True,
    ) -> dict[str, torch.Tensor]:
        """This rank's part of a global batch ``[B, S]``: ``input_ids``, ``position_ids``,
        ``labels`` and, for packed documents, padding or a length the layout cannot split
        evenly, ``usp_documents`` (pass them all to the model with ``usp_context=self``).

        ``labels`` follow transformers' convention (default ``input_ids``; ``-100`` is ignored;
        the model would shift them). They are shifted **globally** before sharding, never across
        a document boundary or into padding: pass them to :meth:`loss`, not to the model.
        ``attention_mask`` ``[B, S]``: padding (1 = token). ``position_ids`` ``[B, S]`` that
        restart at 0 in every document (``DataCollatorWithFlattening``): packed documents,
        attention stays inside each. Rows are split over dp; ``split_rows=False`` keeps them all,
        for a batch that holds this dp rank's rows already (a data loader that shards over dp, as
        :mod:`usp.integrations.trainer`'s does).
        """
        labels = input_ids if labels is None else labels
        for name, other in (("labels", labels), ("attention_mask", attention_mask),
                            ("position_ids", position_ids)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(f"{name} {tuple(other.shape)} and input_ids "
                                 f"{tuple(input_ids.shape)} must both be [B, S]")
        documents = None
        if position_ids is not None:
            documents = documents_from_positions(position_ids)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            documents = torch.zeros_like(input_ids) if documents is None else documents
            documents = documents.masked_fill(~attention_mask.bool(), NOT_A_TOKEN)
        # windows of S + 1: one extra column that is no token and no label
        pad = torch.full_like(input_ids[:, :1], IGNORE_INDEX)
        topology = self.topology
        if not split_rows:  # the sequence split alone: this rank's rows are the whole batch
            topology = dataclasses.replace(topology, sizes={**topology.sizes, "dp": 1},
                                           ranks={**topology.ranks, "dp": 0})
        batch = shard_batch(
            torch.cat([input_ids, pad.clamp(min=0)], dim=1), topology, self.layout,
            targets=torch.cat([labels, pad], dim=1),
            documents=None if documents is None else torch.cat(
                [documents, torch.full_like(pad, NOT_A_TOKEN)], dim=1),
        )
        if "documents" in batch:
            batch["usp_documents"] = batch.pop("documents")
        return batch

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The exact mean cross-entropy over all ranks' labels (from :meth:`shard`).

        Its gradient is this rank's share: sum gradients over dp × ring × ulysses.
        """
        return global_mean_cross_entropy(logits, labels, self.topology)

    def agree(self, refusal: str | None) -> None:
        """Raise the refusal of any rank as the same ValueError on every rank (one all-gather)."""
        agree(self._group, {}, refusal)

    def attention(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  request, refusal: str | None, *, scaling: float | None, position_ids,
                  documents, cu_seqlens, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's attention on this rank's shard: query [B, Hq, S_RU, D], key/value
        [B, Hkv, S_RU, D] -> [B, S_RU, Hq, D]. ``request``: the layer's mask request;
        ``refusal``: why this rank cannot run it (None: it can). Subclasses attend otherwise
        (``usp.infer.hf``'s generation, against a sharded KV cache)."""
        if refusal is None and request.cached:  # refusal None: request is a MaskRequest
            refusal = (f"the model attends {query.shape[2]} queries to "
                       f"{request.cached + query.shape[2]} keys (a KV cache); usp runs "
                       "self-attention over the whole sequence: pass use_cache=False and no "
                       "past_key_values, or generate with usp.infer.hf.USPCache")
        if not isinstance(request, MaskRequest) or not request.agreed:
            if refusal is None and self.forward_checks is not None:
                refusal = self.forward_checks.refusal
            try:
                self.agree(refusal)
            except ValueError:
                self.forward_checks = None  # the forward ends here, before its last hook
                raise
            request.mask = _global_mask(request, query, self, documents, cu_seqlens)
            self.agree(_position_refusal(request.mask, position_ids, query, self))
            request.agreed = True  # agree() raised unless the mask is a MaskRequest
        return usp_attention(
            # [B, H, S_RU, D] -> [B, S_RU, H, D]
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.topology,
            layout=self.layout, softmax_scale=scaling, kernel=self.kernel, mask=request.mask,
            sinks=sinks, ring_layout=self.ring_layout,
        )


def check_config(config, topology: Topology, scans: bool = False) -> None:
    """Raise ValueError for model settings that usp cannot run exactly on ``topology``.

    :meth:`USPContext.prepare` calls it to fail before the first forward; the mask and attention
    functions refuse the same settings (and anything else) at run time in any case. Layers that
    mix tokens other than softmax attention are found here from the config's layer types alone;
    :func:`check_sequence_mixers` looks at the model's modules too. ``scans``: the model will be
    prepared, so the state-space layers of the hybrids usp splits are accepted
    (``usp.integrations.hf_scan``); otherwise (generation, a model never prepared) refused.
    """
    check_sequence_mixers(config_sequence_mixers(config, scans=scans), topology)
    heads = getattr(config, "num_attention_heads", None)
    if heads:  # a model without softmax attention has no heads to split
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_plan(heads, kv_heads, topology.size("ulysses"))
    check_rope(config)
    check_router_loss(config, topology)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None:
        raise ValueError(
            f"{type(config).__name__}.attention_chunk_size={chunk} asks for chunked attention, "
            "which usp does not run; use another attn_implementation for this model"
        )


def check_router_loss(config, topology: Topology) -> None:
    """A mixture-of-experts model that returns its router's load-balancing loss: its value over
    the ranks is reduced from the router's statistics (``usp.integrations.hf_moe``, in the
    prepared model's forward hook, :class:`ForwardChecks`) for the models whose loss that module
    knows; another is refused while the ranks hold different tokens."""
    if topology.data_size > 1:
        check_router_loss_model(config)


class ForwardChecks:
    """What a prepared model's forward hooks check and fix (``USPContext.prepare``).

    Before the forward (:meth:`start`): ``labels`` passed to the model while the sequence is
    split are refused (transformers would shift them inside each rank's shard and average each
    rank's own tokens; :meth:`USPContext.shard` shifts them globally for
    :meth:`USPContext.loss`). The refusal is agreed in the first attention layer's agreement, so
    every rank raises and none waits. The model's ``position_ids`` are kept for attention
    layers that are not handed them. After it (:meth:`finish`): a mixture-of-experts output's
    ``aux_loss``, each rank's own over its tokens, is replaced by the whole batch's
    (``usp.integrations.hf_moe.global_router_loss``) when the ranks hold different tokens.
    """

    def __init__(self, refusal: str | None, position_ids: torch.Tensor | None = None) -> None:
        self.refusal = refusal
        # the model's position_ids, for the attention of a model whose decoder layers do not
        # pass them on (Granite 4's): usp checks them against the layout
        self.position_ids = position_ids

    @staticmethod
    def start(module, args, kwargs) -> None:
        context = kwargs.get("usp_context")
        if not isinstance(context, USPContext):
            return
        topology, refusal = context.topology, None
        split = topology.size("ring") * topology.size("ulysses")
        if kwargs.get("labels") is not None and split > 1:
            refusal = (f"labels passed to the model while ring x ulysses = {split} ranks split "
                       "the sequence: transformers would shift them inside each rank's shard; "
                       "pass the labels of USPContext.shard to USPContext.loss(logits, labels)")
        context.forward_checks = ForwardChecks(refusal, kwargs.get("position_ids"))

    @staticmethod
    def finish(module, args, kwargs, output):
        context = kwargs.get("usp_context")
        if not isinstance(context, USPContext):
            return output
        context.forward_checks = None
        router_logits = getattr(output, "router_logits", None)
        if router_logits and context.topology.data_size > 1:
            experts, top_k, _ = router_settings(module)
            rows = token_rows(kwargs.get("usp_documents"), kwargs.get("attention_mask"),
                              context.topology, context.layout, router_logits[0])
            aux = global_router_loss(router_logits, experts, top_k, context.topology, rows)
            output.aux_loss = aux.to(torch.promote_types(router_logits[0].dtype, torch.float32))
        return output


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
    usp_documents: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook for ``"usp"``.

    query [B, Hq, S_RU, D], key/value [B, Hkv, S_RU, D] -> ([B, S_RU, Hq, D], None).
    The mask comes from the model's mask request (causal or not, its sliding window, this rank's
    padding) and the batch's documents (``usp_documents`` from :meth:`USPContext.shard`, or the
    global ``cu_seq_lens_q`` of transformers' packing collator). ``s_aux`` [Hq]: GPT-OSS's
    attention sinks (:func:`usp.usp_attention`'s ``sinks``).
    """
    config = getattr(module, "config", None)
    if not isinstance(usp_context, USPContext):
        raise ValueError(
            f'attn_implementation="{ATTENTION_NAME}" needs the forward kwarg usp_context='
            "USPContext(topology, layout); got " + repr(usp_context)
        )
    if isinstance(attention_mask, MaskRequest) and usp_context.forward_checks is None:
        # a model never prepared: its config's layer types are the last check (the same on
        # every rank: no agreement needed); a prepared one's mixers were checked, or are split.
        # A generation runs the scan layers usp knows whole, their states in its cache.
        mixers = (attention_mask.sequence_mixers if usp_context.shards_hidden_states
                  else attention_mask.unknown_mixers)
        check_sequence_mixers(list(mixers), usp_context.topology)
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
    if config is not None:
        check_rope(config)
    if position_ids is None and usp_context.forward_checks is not None:
        position_ids = usp_context.forward_checks.position_ids  # what the model was given
    refusal = _local_refusal(attention_mask, query, key, is_causal, sliding_window)
    if (refusal is None and options.get("output_router_logits")
            and usp_context.topology.data_size > 1 and usp_context.forward_checks is None):
        refusal = ("the model returns its router logits, and its router load-balancing loss "
                   "(outputs.aux_loss) would be each rank's own: prepare the model with "
                   "USPContext.prepare(model), whose forward reduces it over the ranks")
    out = usp_context.attention(module, query, key, value, attention_mask, refusal,
                                scaling=scaling, position_ids=position_ids,
                                documents=usp_documents, cu_seqlens=cu_seq_lens_q, sinks=s_aux)
    return out, None


def _global_mask(request: MaskRequest, query, context: USPContext, documents,
                 cu_seqlens) -> AttentionMask:
    """The forward's mask over the global sequence: the request's causal flag and window, the
    batch's documents, and every rank's padding (gathered: it is per shard)."""
    topology, layout = context.topology, context.layout
    slots = query.shape[2] * topology.sequence_size
    padding = None
    if request.padded:  # every rank of this forward has an attention_mask: gather the shards
        local = (request.padding if request.padding is not None
                 else torch.ones(query.shape[0], query.shape[2], dtype=torch.bool))
        padding = unshard_sequence(local.to(torch.uint8).to(query.device), topology, layout)
        padding = padding.bool().cpu()
    # shard() gives the documents of the real sequence; the layout may have padded it to more
    # slots, which hold no token
    real_len = None if documents is None else documents.shape[-1]
    return AttentionMask.build(slots, causal=request.causal, window=request.window,
                               documents=documents, cu_seqlens=cu_seqlens, padding_mask=padding,
                               real_len=real_len)


def _local_refusal(attention_mask, query, key, is_causal, sliding_window) -> str | None:
    """Why this rank cannot run the attention exactly, or None."""
    if not isinstance(attention_mask, MaskRequest):
        return (
            f"the attention received a {type(attention_mask).__name__} mask that transformers did "
            f'not build through the "{ATTENTION_NAME}" mask function (a custom 4-D mask or '
            "BlockMask); usp runs the masks transformers builds (causal, sliding windows, "
            "padding, packed documents)"
        )
    if attention_mask.refusal is not None:
        return attention_mask.refusal
    if is_causal is not None and is_causal != attention_mask.causal:
        return f"the layer asks is_causal={is_causal}, its mask causal={attention_mask.causal}"
    if sliding_window is not None and attention_mask.window is None:
        return (f"the layer asks for a sliding window of {sliding_window} tokens but its mask "
                "has none; usp follows the mask, which would disagree with the layer")
    if key.shape[2] != query.shape[2] and not attention_mask.cached:  # a cache: the context's
        return f"{query.shape[2]} queries attend {key.shape[2]} keys; pass use_cache=False"
    return None


def _position_refusal(mask: AttentionMask, position_ids, query, context: USPContext) -> str | None:
    """RoPE must see each token's position in its document (its global position when the
    sequence is one document): the positions a rank holds, under the layout."""
    topology, layout = context.topology, context.layout
    local_len, slots = query.shape[2], mask.seq_len
    if position_ids is None:
        return (
            "the attention layers received no position_ids; pass the model position_ids="
            "USPContext.shard(...)['position_ids'] (usp checks them against the layout)"
        )
    ids = (mask.documents if mask.documents is not None
           else torch.zeros(1, slots, dtype=torch.long))
    here = sequence_positions(slots, topology, layout)
    expected = positions_in_documents(ids)[:, here]
    tokens = ids[:, here] != NOT_A_TOKEN  # padding may hold any position
    given = position_ids.detach().cpu()
    if given.shape[-1] != local_len or not bool(((given == expected) | ~tokens).all()):
        return (
            f"position_ids must be the positions of this rank's {local_len} of {slots} slots "
            f"under layout={layout!r} over ring={topology.ring_size} x ulysses="
            f"{topology.ulysses_size}, counted from 0 in each packed document: pass "
            "USPContext.shard(...)['position_ids'] (for packed documents: shard(..., "
            "position_ids=...) with positions that restart in each document)"
        )
    return None


FORWARD_KWARGS = ("usp_context", "usp_documents")


def register() -> None:
    """Register ``"usp"`` with transformers' attention and mask registries (idempotent).

    ``generate`` refuses model kwargs that transformers does not know as attention kwargs; the
    two that usp passes through every model's forward to its attention function are declared
    as such, so ``model.generate(..., usp_context=...)`` works like ``model(..., usp_context=...)``.
    """
    AttentionInterface.register(ATTENTION_NAME, usp_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, usp_mask)
    TransformersKwargs.__optional_keys__ = TransformersKwargs.__optional_keys__ | frozenset(
        FORWARD_KWARGS)


register()

"""Hugging Face generation over a sharded KV cache: ``model.generate`` with a :class:`USPCache`.

``model.generate(ids, past_key_values=cache, usp_context=cache.context, ...)`` on a model loaded
with ``attn_implementation="usp"`` runs transformers' own loop (greedy, sampling, stopping) on
every rank with the same prompt. Each layer's keys and values go to :class:`USPCache`, a
transformers ``Cache`` whose storage is a :class:`~usp.infer.cache.ShardedKVCache`: a rank keeps
its layout shard of the prompt and its share of the decoded tokens. The attention goes through
:class:`GenerationContext`:

- the prompt: this rank's shard of q/k/v runs :func:`usp.usp_attention` (ring x Ulysses), and
  the outputs are gathered back, because transformers runs the rest of the layer on the whole
  prompt on every rank (only attention and the KV cache are split here; ``usp.infer.prefill``
  splits the whole model for ``usp.models.Llama``);
- each new token: the rank's shard in one kernel call, one all-gather of ``(out, lse)`` per
  layer, the same merge on every rank (:func:`usp.infer.attention.decode_attention`).

Hybrids (Bamba, Nemotron-H, Qwen3-Next): their scan layers run transformers' own forward on the
whole prompt on every rank, like the rest of the layer, and keep their convolution and recurrent
states in transformers' ``LinearAttentionLayer`` inside the :class:`USPCache`, the same on every
rank (the state is replicated: each rank carries it from the prompt through every new token). Only the
attention layers' keys and values are sharded.

Refused with a ValueError: padding in the batch, sliding windows, a prompt that continues a
non-empty cache, beam search and the other cache reorderings, a hybrid whose scan layers usp
does not know. ``usp generate --hf-model`` runs
this through the Hugging Face family's adapter (``usp.infer.hf_generation``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

try:  # one Cache of attention, scan and cacheless layers, as the hybrids use it from 5.23 on
    from transformers.cache_utils import (DummyLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionLayer)
except ImportError:  # older transformers: a USPCache refuses hybrids
    DummyLayer = LinearAttentionLayer = LinearAttentionAndFullAttentionLayer = None

from usp.attention import usp_attention
from usp.attention.kernels import default_scale, resolve_kernel
from usp.infer.attention import decode_attention
from usp.infer.cache import ShardedKVCache
from usp.integrations.hf_masks import MaskRequest
from usp.integrations.transformers import USPContext, check_config
from usp.layout import shard_positions, shard_sequence, unshard_sequence
from usp.topology import Topology

Tensor = torch.Tensor


class GenerationContext(USPContext):
    """The ``usp_context`` of a generation: the topology, layout, kernel and the sharded cache
    (``slots``: the cache's slot of each attention layer, by layer index)."""

    # transformers runs every layer but attention on the whole prompt on every rank
    shards_hidden_states = False

    def __init__(self, topology: Topology, layout: str, kernel: str,
                 sharded: ShardedKVCache, slots: dict[int, int]) -> None:
        super().__init__(topology, layout, kernel)
        self.sharded, self.slots = sharded, slots
        self._kernel = None
        self.stored = None  # the slot the last attention layer stored its new keys in

    def slot_of(self, module) -> int:
        """The cache slot of an attention ``module``: by its layer index, or (an attention block
        shared by several layers, as Zamba2's, whose index the layer passes to the cache
        instead) the slot its layer has just stored into."""
        index = getattr(module, "layer_idx", None)
        return self.slots[index] if index in self.slots else self.stored

    def attention(self, module, query: Tensor, key: Tensor, value: Tensor, request,
                  refusal: str | None, *, scaling: float | None, position_ids, documents,
                  cu_seqlens, sinks: Tensor | None = None) -> Tensor:
        """query [B, Hq, T, D], key/value [B, Hkv, T, D] (the T new tokens, the same on every
        rank) -> [B, T, Hq, D], the same on every rank."""
        if not isinstance(request, MaskRequest) or not request.agreed:
            self.agree(refusal or _generation_refusal(request, query, documents, cu_seqlens))
            request.agreed = True
        # [B, H, T, D] -> [B, T, H, D]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if self._kernel is None:
            self._kernel = resolve_kernel(self.kernel, query)
        if request.cached == 0:  # the prompt: this rank's shard through usp_attention
            length = query.shape[1]
            shards = [shard_sequence(t, self.topology, self.layout) for t in (query, key, value)]
            out = usp_attention(*shards, self.topology, causal=True, layout=self.layout,
                                seq_len=length, softmax_scale=scaling, kernel=self._kernel,
                                sinks=sinks)
            return unshard_sequence(out, self.topology, self.layout, seq_len=length)
        keys, values = self.sharded.layer(self.slot_of(module))
        group = self.topology.sequence_group if self.topology.sequence_size > 1 else None
        scale = default_scale(query.shape[-1], scaling)
        return decode_attention(query, keys, values, group, scale, self._kernel, sinks)


def _generation_refusal(request, query: Tensor, documents, cu_seqlens) -> str | None:
    if request.window is not None or not request.causal:
        return (f"generation with a USPCache runs causal attention without a sliding window; "
                f"the model asks causal={request.causal}, window={request.window}")
    if request.padding is not None or documents is not None or cu_seqlens is not None:
        return "generation with a USPCache runs unpadded batches of single documents"
    if request.cached and query.shape[2] != 1:
        return (f"{query.shape[2]} new tokens after {request.cached} cached: a USPCache "
                "generates from an empty cache, one token at a time after the prompt")
    return None


class _ShardedLayer(CacheLayerMixin):
    """One attention layer's view of the shared :class:`ShardedKVCache` (``index``: its slot)."""

    is_sliding = False

    def __init__(self, parent: "USPCache", index: int) -> None:
        super().__init__()
        self.parent, self.index = parent, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the sharded cache allocates its storage when it is built."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.parent.store(self.index, key_states, value_states)
        self.parent.context.stored = self.index
        return key_states, value_states  # the attention reads the cache through the context

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.parent.sharded.length

    def get_max_length(self) -> int:
        return self.parent.sharded.max_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("a USPCache does not reorder its batch (beam search); use greedy "
                         "decoding or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("a USPCache holds one row per prompt; pass num_return_sequences=1")


class _ShardedHybridLayer(_ShardedLayer, *(
        () if LinearAttentionAndFullAttentionLayer is None
        else (LinearAttentionAndFullAttentionLayer,))):
    """A layer with attention and a scan side by side (Falcon-H1's, Zamba2's "hybrid"
    layers): the attention's keys and values in the shared :class:`ShardedKVCache`, the scan's
    convolution and recurrent states whole, as transformers' ``LinearAttentionLayer`` keeps
    them (its subclass for such layers, so the Cache treats the layer as transformers' own)."""

    def __init__(self, parent: "USPCache", index: int, number_of_states: int) -> None:
        super().__init__(parent, index)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)
        self.is_initialized = True

    def lazy_initialization(self, *args, **kwargs) -> None:
        if args:  # the attention's keys and values: the sharded cache holds them already
            return
        LinearAttentionLayer.lazy_initialization(self, **kwargs)  # the scan's states


# the layer type transformers' hybrid configs give their scan layers (Bamba's and Nemotron-H's
# Mamba-2, Qwen3-Next's gated delta rule): a convolution and a recurrent state, no keys and
# values; and the types of layers that hold no cache at all (Nemotron-H's MLP and MoE layers)
SCAN_LAYERS = ("linear_attention", "conv")  # LFM2's short convolutions keep a conv state
NO_CACHE_LAYERS = ("mlp", "moe")
HYBRID_LAYER = "hybrid"  # attention and a scan in one layer (Falcon-H1, Zamba2)
# attention layers' types (a window is refused when the model asks for it, at the first forward)
ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")
# whether this transformers keeps those layers in one Cache with the attention's (tested: 5.23)
HYBRID_STATES = LinearAttentionAndFullAttentionLayer is not None and DummyLayer is not None


class USPCache(Cache):
    """A transformers ``Cache`` over a :class:`ShardedKVCache` for ``max_tokens`` tokens; pass
    ``usp_context=cache.context`` to ``generate`` with it. A hybrid's scan layers keep their
    states whole (transformers' ``LinearAttentionLayer``), the same on every rank."""

    def __init__(self, config, topology: Topology, layout: str = "zigzag", *, max_tokens: int,
                 batch: int = 1, dtype: torch.dtype = torch.float32,
                 device: "str | torch.device" = "cpu", kernel: str = "auto") -> None:
        # the scan layers of the hybrids usp knows run whole here: their states fit this cache
        check_config(config, topology, scans=HYBRID_STATES)
        types = getattr(config, "layer_types", None) or ["full_attention"] * (
            config.num_hidden_layers)
        unknown = sorted(set(types) - {*SCAN_LAYERS, HYBRID_LAYER, *NO_CACHE_LAYERS,
                                       *ATTENTION_LAYERS})
        if unknown:  # a layer usp never met
            raise ValueError(
                f"{type(config).__name__} has layers of the types {unknown}; a USPCache keeps "
                f"the states of {sorted(ATTENTION_LAYERS)}, {list(SCAN_LAYERS)}, {HYBRID_LAYER!r} "
                f"and cacheless {sorted(NO_CACHE_LAYERS)} layers only")
        if not HYBRID_STATES and set(types) & {*SCAN_LAYERS, HYBRID_LAYER, *NO_CACHE_LAYERS}:
            raise ValueError(
                f"{type(config).__name__} has layers other than attention ({sorted(set(types))}"
                "); a USPCache keeps their states with transformers 5.23 (pip install "
                "'transformers>=5.23,<5.24')")
        attention = [index for index, kind in enumerate(types)
                     if kind not in SCAN_LAYERS and kind not in NO_CACHE_LAYERS]
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.sharded = ShardedKVCache(
            topology, layout, n_layers=len(attention),
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim, max_tokens=max_tokens, batch=batch, dtype=dtype, device=device)
        self.topology = topology
        slots = {layer: slot for slot, layer in enumerate(attention)}
        self.context = GenerationContext(topology, layout, kernel, self.sharded, slots)
        states = getattr(config, "number_of_conv_states", 1)
        super().__init__(layers=[
            _ShardedHybridLayer(self, slots[index], states) if types[index] == HYBRID_LAYER
            else _ShardedLayer(self, slots[index]) if index in slots
            else DummyLayer() if types[index] in NO_CACHE_LAYERS
            else LinearAttentionLayer(number_of_states=states)
            for index in range(len(types))])

    def store(self, layer: int, key_states: Tensor, value_states: Tensor) -> None:
        """Keep this rank's part of the new tokens' ``[B, Hkv, T, D]`` keys and values in slot
        ``layer``; the first attention layer of a forward places the new tokens on the shards."""
        sharded, topology = self.sharded, self.topology
        new = key_states.shape[2]
        if key_states.shape[0] != sharded.batch:
            raise ValueError(
                f"the USPCache holds {sharded.batch} rows and the model runs "
                f"{key_states.shape[0]}: beam search and num_return_sequences > 1 multiply the "
                "rows, which a USPCache does not do; use greedy decoding or sampling"
            )
        prompt = sharded.length == 0 if layer == 0 else sharded.length == new
        if layer == 0 and prompt:  # the prompt: each rank its layout shard
            ring, ulysses = topology.ring_size, topology.ulysses_size
            slots = [shard_positions(new, ring, ulysses, index // ulysses, index % ulysses,
                                     sharded.layout) for index in range(sharded.shards)]
            sharded.extend([s[s < new] for s in slots])
        elif layer == 0:  # new tokens go, one each, to the shards with the fewest
            owner = sharded.next_owner()
            sharded.extend([torch.arange(sharded.length, sharded.length + new)
                            if index == owner else torch.empty(0, dtype=torch.int64)
                            for index in range(sharded.shards)])
        keys, values = (t.transpose(1, 2) for t in (key_states, value_states))  # [B, T, H, D]
        if prompt:
            keys, values = (shard_sequence(t, topology, sharded.layout) for t in (keys, values))
        rows = sharded.pending_rows
        sharded.store(layer, keys[:, :rows], values[:, :rows])

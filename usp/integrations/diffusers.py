"""diffusers: Flux and SD3 transformers with their image tokens sharded over a sequence group.

``parallelize_transformer(model, topology)`` changes a ``FluxTransformer2DModel`` or an
``SD3Transformer2DModel`` in place, in three places and nowhere else:

- a forward pre-hook on the model (Flux) or a forward hook on the patch embedding (SD3) keeps
  this rank's contiguous shard of the image tokens (shard ``topology.sequence_rank``); for Flux
  it shards ``img_ids`` alike, so the rotary embedding the model builds is that of
  ``[text; local image]``;
- every attention module gets a processor that calls :func:`usp.attention.joint.joint_attention`
  (text replicated, image sharded; SD3.5's image-only second attention calls
  :func:`usp.usp_attention`);
- a forward hook on ``proj_out`` gathers the image tokens back, so every rank returns the whole
  output, equal to the single-process model's.

Gradients (training): compute the same loss from the gathered output on every rank; then every
gradient, of the parameters and the inputs alike, is a partial sum: its sum over the sequence
group is the exact single-process gradient (what FSDP2 over the sequence group computes).
The model must see the same inputs on every rank, and the image length must be a multiple of
the sequence size. Fused QKV projections, attention masks and IP-adapters are refused.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.embeddings import apply_rotary_emb

from usp.attention.joint import joint_attention
from usp.attention.usp import usp_attention
from usp.layout import unshard_sequence
from usp.topology import Topology

Tensor = torch.Tensor


class TextLength:
    """The text length of the forward in flight: Flux's single-stream blocks hand the processor
    ``[text; image]`` in one tensor, and only the model's inputs say where the text ends."""

    def __init__(self) -> None:
        self.value: int | None = None


def _check_unfused(attn) -> None:
    if getattr(attn, "fused_projections", False):
        raise ValueError("fused QKV projections are not supported by the usp processors; "
                         "call model.unfuse_qkv_projections() first")


def _heads(x: Tensor, head_dim: int) -> Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, S, H·D] -> [B, S, H, D]


class USPFluxAttnProcessor:
    """Flux's attention (double- and single-stream blocks) over a sharded image."""

    def __init__(self, topology: Topology, text_length: TextLength, kernel: str = "auto") -> None:
        self.topology, self.text_length, self.kernel = topology, text_length, kernel

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None):
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by USPFluxAttnProcessor")
        _check_unfused(attn)
        single_stream = encoder_hidden_states is None
        # the single-stream block concatenated [text; image] before calling us
        text_len = self.text_length.value if single_stream else encoder_hidden_states.shape[1]
        if text_len is None:
            raise ValueError("the text length is unknown: run the model parallelized by "
                             "usp.integrations.diffusers.parallelize_transformer")
        q, k, v = (_heads(proj(hidden_states), attn.head_dim)  # [B, S, H, D]
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if single_stream:
            (tq, q), (tk, k), (tv, v) = (t.split([text_len, t.shape[1] - text_len], dim=1)
                                         for t in (q, k, v))
        else:
            tq, tk, tv = (_heads(proj(encoder_hidden_states), attn.head_dim)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        if image_rotary_emb is not None:  # cos, sin: [S_txt + S_img_local, D], text rows first
            text_rope, image_rope = zip(*(f.split([text_len, f.shape[0] - text_len])
                                          for f in image_rotary_emb))
            tq, tk = (apply_rotary_emb(t, text_rope, sequence_dim=1) for t in (tq, tk))
            q, k = (apply_rotary_emb(t, image_rope, sequence_dim=1) for t in (q, k))
        out, text_out = joint_attention(q, k, v, tq, tk, tv, self.topology, kernel=self.kernel)
        out, text_out = out.flatten(2, 3), text_out.flatten(2, 3)  # [B, S, H·D]
        if single_stream:
            return torch.cat([text_out, out], dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, attn.to_add_out(text_out)


class USPJointAttnProcessor:
    """SD3's joint attention ([image; text]) and SD3.5's image-only second attention."""

    def __init__(self, topology: Topology, kernel: str = "auto") -> None:
        self.topology, self.kernel = topology, kernel

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None):
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by USPJointAttnProcessor")
        _check_unfused(attn)
        head_dim = attn.to_k.out_features // attn.heads
        q, k, v = (_heads(proj(hidden_states), head_dim)  # [B, S_RU, H, D]
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is None:  # SD3.5's second attention: the image alone
            out = usp_attention(q, k, v, self.topology, layout="contiguous", kernel=self.kernel)
            return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))
        tq, tk, tv = (_heads(proj(encoder_hidden_states), head_dim)  # [B, S_txt, H, D]
                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        out, text_out = joint_attention(q, k, v, tq, tk, tv, self.topology, kernel=self.kernel)
        out, text_out = out.flatten(2, 3), text_out.flatten(2, 3)  # [B, S, H·D]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](out)), text_out


class ParallelTransformer:
    """What :func:`parallelize_transformer` installed; :meth:`remove` puts the model back."""

    def __init__(self, model, hooks: list, processors: dict) -> None:
        self.model, self.hooks, self.original_processors = model, hooks, processors

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.model.set_attn_processor(dict(self.original_processors))


def _image_shard(x: Tensor, topology: Topology, dim: int, what: str) -> Tensor:
    """This rank's contiguous shard of the image tokens along ``dim``; ValueError naming the
    numbers when they do not split evenly."""
    length, ranks = x.shape[dim], topology.sequence_size
    if length % ranks:
        raise ValueError(f"{what} has {length} image tokens, not a multiple of the sequence "
                         f"size {ranks} (ring={topology.ring_size} x ulysses="
                         f"{topology.ulysses_size}); choose a resolution that splits evenly")
    shard = length // ranks
    return x.narrow(dim, topology.sequence_rank * shard, shard)


def parallelize_transformer(model, topology: Topology, *, kernel: str = "auto"
                            ) -> ParallelTransformer:
    """Shard ``model``'s image tokens over ``topology``'s sequence group (see the module
    docstring); ``model`` is a ``FluxTransformer2DModel`` or an ``SD3Transformer2DModel``."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if not isinstance(model, (FluxTransformer2DModel, SD3Transformer2DModel)):
        raise ValueError(f"{type(model).__name__} is not supported; parallelize_transformer "
                         "knows FluxTransformer2DModel and SD3Transformer2DModel")
    original, hooks = model.attn_processors, []
    if isinstance(model, FluxTransformer2DModel):
        text_length = TextLength()
        signature = inspect.signature(model.forward)

        def shard_inputs(module, args, kwargs):
            bound = signature.bind(*args, **kwargs)
            if bound.arguments.get("joint_attention_kwargs"):
                raise ValueError("joint_attention_kwargs (IP-adapters, LoRA scales) are not "
                                 "supported by the usp processors")
            text_length.value = bound.arguments["encoder_hidden_states"].shape[1]
            hidden = bound.arguments["hidden_states"]  # [B, S_img, C]
            bound.arguments["hidden_states"] = _image_shard(hidden, topology, 1, "hidden_states")
            ids = bound.arguments["img_ids"]  # [S_img, 3] (or the deprecated [1, S_img, 3])
            bound.arguments["img_ids"] = _image_shard(ids, topology, ids.dim() - 2, "img_ids")
            return bound.args, bound.kwargs

        hooks.append(model.register_forward_pre_hook(shard_inputs, with_kwargs=True))
        model.set_attn_processor(USPFluxAttnProcessor(topology, text_length, kernel))
    else:
        hooks.append(model.pos_embed.register_forward_hook(
            lambda module, args, out: _image_shard(out, topology, 1, "the patch embedding")))
        model.set_attn_processor(USPJointAttnProcessor(topology, kernel))
    hooks.append(model.proj_out.register_forward_hook(
        lambda module, args, out: unshard_sequence(out, topology, "contiguous")))
    return ParallelTransformer(model, hooks, original)

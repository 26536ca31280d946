"""usp's Llama as transformers' ``LlamaForCausalLM`` (``usp export``, ``usp.training.export``).

The architectures are the same (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) but for the
order of each head's query and key features: usp rotates consecutive pairs ``(2i, 2i + 1)``
(Meta's layout), transformers rotates ``i`` with ``i + head_dim / 2``. Reordering the rows of the
query and key projections from one to the other gives the same attention scores, so the
exported model computes the same logits.
"""

from __future__ import annotations

import re

import torch

from usp.models.family import ModelSettings
from usp.models.llama.presets import get_config

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_NAMES = {  # usp name (inside a block) -> transformers name
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def hf_config(settings: ModelSettings, *, dtype: torch.dtype, eos_token_id: int):
    """The preset as a transformers ``LlamaConfig``."""
    from transformers import LlamaConfig

    config = get_config(settings.model)
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None,
        architectures=["LlamaForCausalLM"], dtype=dtype,
    )


def half_rotation_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's rows from consecutive pairs to halves, per head: row ``2i + j`` of a head
    moves to ``i + j * head_dim / 2``."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows,
                                                                                       columns)


def hf_tensors(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor under its transformers name, the query and key rows reordered."""
    if name in _TOP:
        if name == "output.weight" and config.tie_word_embeddings:
            return []  # the embedding, written once
        return [(_TOP[name], tensor)]
    match = _LAYER.fullmatch(name)
    if match is None or match.group(2) not in _NAMES:
        raise ValueError(f"the checkpoint holds {name!r}, which is no tensor of usp's Llama")
    layer, inner = match.groups()
    if inner == "attention.wq.weight":
        tensor = half_rotation_rows(tensor, config.num_attention_heads)
    elif inner == "attention.wk.weight":
        tensor = half_rotation_rows(tensor, config.num_key_value_heads)
    return [(f"model.layers.{layer}.{_NAMES[inner]}", tensor)]


def generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=config.eos_token_id, do_sample=False)

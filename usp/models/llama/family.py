"""The Llama family's entry in the model registry: usp's own decoder, named by a preset
(``--model``), initialised from a seed; every parallelism and every loss of ``usp.losses``.

Like every entry it imports no torch (``usp.models.registry``): reading it answers which
settings it claims and what a preset's sizes and record are; its parts (the model, the plan,
the stage cut, the tensor-parallel plan) are named by import path and load when first called.
Its generation runs in ``usp.infer`` (prefill and decode over the sharded KV cache,
``usp.infer.llama_generation``), a layer above this one.
"""

from __future__ import annotations

import dataclasses

from usp.choices import LOSSES
from usp.models.counts import parameter_count
from usp.models.family import (
    Exporter, InferenceAdapter, ModelFamily, ModelPlan, ModelSettings, ModelSize,
)
from usp.models.llama.presets import get_config
from usp.models.registry import lazy

PACKAGE = "usp.models.llama"


def claims(settings: ModelSettings) -> bool:
    """A preset is the default: the settings name no Hugging Face config or model."""
    return settings.hf_config is None and settings.hf_model is None


def size(settings: ModelSettings) -> ModelSize:
    """The preset's vocabulary and parameters (its gated MLP has three matrices)."""
    config = get_config(settings.model)
    return ModelSize(config.vocab_size, parameter_count(
        config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads,
        config.head_dim, config.ffn_dim, 3, config.tie_embeddings))


def check_generation(settings: ModelSettings, text: str, ranks: int, dtype: str) -> None:
    """Generation needs an existing preset only (any text has bytes; any rank holds a preset)."""
    get_config(settings.model)


LLAMA = ModelFamily(
    name="llama",
    claims=claims,
    display_name=lambda settings: settings.model,
    size=size,
    validate=lazy(f"{PACKAGE}.plan:validate"),
    skeleton=lazy(f"{PACKAGE}.model:skeleton"),
    metadata=lambda settings: dataclasses.asdict(get_config(settings.model)),
    plan=ModelPlan(
        check=lazy(f"{PACKAGE}.plan:check"),
        use_attention=lazy(f"{PACKAGE}.plan:use_usp_attention"),
        tensor_parallel=lazy(f"{PACKAGE}.tp:apply_llama_tensor_parallel"),
        keep_stage=lazy(f"{PACKAGE}.stages:keep_stage"),
        mlp=lambda block: block.feed_forward,
        attention=lambda block: block.attention,
        losses=LOSSES,
    ),
    flops_per_token=lazy(f"{PACKAGE}.model:Llama.flops_per_token"),
    inference=InferenceAdapter(
        check=check_generation,
        generate=lazy("usp.infer.llama_generation:generate_text"),
    ),
    export=Exporter(
        config=lazy(f"{PACKAGE}.export:hf_config"),
        tensors=lazy(f"{PACKAGE}.export:hf_tensors"),
        generation_config=lazy(f"{PACKAGE}.export:generation_config"),
    ),
)
